"""The torch side of LayerCollapse: swap MLP activations for PReLU, regularize slopes toward 1, collapse, export.

    names = prepare(model, (x,))                             # sites from one recorded forward pass
    opt = torch.optim.AdamW(param_groups(model, lr=1e-3))    # slopes get their own step size, no decay
    loss = ce + 1.0 * regularizer(model)                     # λ·Σ(α−1)², λ = 1 (the README's recipe)
    loss = loss + distill_loss(logits, teacher(x))           # optional: KL from the GELU model (teacher=)
    collapse(model, threshold=0.05)                          # blocks within 0.05 of slope 1 -> one Linear
    export(model, (x,), "model.onnx")                        # then `lc-onnx optimize` sees the PRelu chains
    from_pretrained(BertModel, folder)                       # a saved HF model, its prepared/collapsed blocks rebuilt

The only package of lc_onnx that imports torch (`pip install lc-onnx[train]`).
"""

from lc_onnx.train.callbacks import LayerCollapseCallback
from lc_onnx.train.collapse import Collapsed, collapse, collapse_sharded
from lc_onnx.train.distill import Distiller, distill_loss
from lc_onnx.train.export import export
from lc_onnx.train.prelu import LayerCollapsePReLU, SharedActivation
from lc_onnx.train.prepare import Prepared, prepare
from lc_onnx.train.pretrained import from_pretrained
from lc_onnx.train.regularize import blocks, decoupled_step, param_groups, regularizer, slope_parameters, slopes
from lc_onnx.train.sensitivity import Sensitivity, sensitivity
from lc_onnx.train.sites import Site

__all__ = ["Collapsed", "Distiller", "LayerCollapseCallback", "LayerCollapsePReLU", "Prepared", "Sensitivity",
           "SharedActivation", "Site", "blocks", "collapse", "collapse_sharded", "decoupled_step", "distill_loss",
           "export", "from_pretrained", "param_groups", "prepare", "regularizer", "sensitivity", "slope_parameters",
           "slopes"]
