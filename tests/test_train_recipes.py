"""The training recipes (docs/training.md), run as the docs write them, reach slope 1 on scikit-learn's digits; and
`prepare` takes BERT's pooler as a site unless `exclude="*pooler*"`, as the README says.

The recipe tests do not copy the snippets: they read them out of docs/training.md (the Python block that calls
`train.param_groups`, and the one that calls `train.decoupled_step`) and exec them, so an edit to the docs is what
the test runs."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
torch = pytest.importorskip("torch")

from lc_onnx import train  # noqa: E402
from tests import scripts  # noqa: E402

ROOT = Path(__file__).parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def recipe(call: str) -> tuple[str, str]:
    """The training docs' Python block that contains `call`, after the first block's imports, cut before
    `train.collapse(`: (training part, the collapse line). Lines after the collapse (export) are no part of it."""
    section = (ROOT / "docs" / "training.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    block = next(b for b in blocks if call in b)
    # a later block goes on from the first, whose imports it does not repeat
    imports = [line for line in blocks[0].splitlines() if line.startswith(("import ", "from "))]
    lines = [line for line in block.splitlines() if line not in imports]
    lines = imports + lines
    at = next(i for i, line in enumerate(lines) if line.startswith("train.collapse("))
    return "\n".join(lines[:at]) + "\n", lines[at] + "\n"


@pytest.fixture(scope="module")
def digits():
    """train_digits.py's model class and 70/30 split (seed 0)."""
    module = scripts.load("train_digits")
    return module, module.data(0)


@pytest.mark.parametrize("call", ["train.param_groups(", "train.decoupled_step("])
def test_readme_recipe_collapses_every_digits_block(digits, call):
    bench, (xtr, ytr, xte, yte) = digits
    fit, fuse = recipe(call)
    torch.manual_seed(0)
    model = bench.DeepMLP(blocks=3)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xtr, ytr), batch_size=64, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    scope = {"model": model, "x": xtr[:2], "loader": loader, "epochs": 30}  # 30 x 20 batches = 600 steps
    exec(compile(fit, f"docs/training.md ({call})", "exec"), scope)
    slopes = train.slopes(model)
    before = bench.accuracy(model, xte, yte)
    assert len(slopes) == 3 and all(abs(s - 1) <= 0.01 for s in slopes.values()), slopes
    exec(compile(fuse, f"docs/training.md ({call})", "exec"), scope)
    assert not train.blocks(model)  # every block fused into one Linear
    after = bench.accuracy(model, xte, yte)
    assert before > 90 and abs(after - before) <= 1, (before, after)


def test_bert_pooler_is_a_site_unless_excluded():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, num_labels=3)
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        default = train.prepare(transformers.BertForSequenceClassification(cfg), {"input_ids": ids})
        excluded = train.prepare(transformers.BertForSequenceClassification(cfg), {"input_ids": ids},
                                 exclude="*pooler*")
    mlp = "bert.encoder.layer.0.intermediate.intermediate_act_fn"
    assert list(default) == [mlp, "bert.pooler.activation"]
    pooler = default.sites[-1]
    assert (pooler.first, pooler.second) == ("bert.pooler.dense", "classifier")
    assert list(excluded) == [mlp]
