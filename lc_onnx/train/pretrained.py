"""Save and load prepared and collapsed Hugging Face models, as peft does for adapters: `prepare` and `collapse`
write what they did into `model.config` (key `lc_onnx`), so `save_pretrained` (and so `Trainer.save_model` and
every checkpoint) stores it in config.json, and `from_pretrained` rebuilds the model from its config, replays
those steps on the new modules, and then loads the weights strictly: a slope or a fused weight that does not land
is an error, never a default. transformers' own `from_pretrained` knows nothing of it and gives back the original
activations (the slopes as "unexpected keys")."""

from __future__ import annotations

import dataclasses
import os

from torch import nn

from lc_onnx.train.sites import Site

KEY = "lc_onnx"  # the config attribute holding the record
VERSION = 1


def _config(model: nn.Module):
    """The model's transformers config, where `save_pretrained` would write it; None for any other model."""
    config = getattr(model, "config", None)
    return config if hasattr(model, "save_pretrained") and hasattr(config, "to_dict") else None


def note(model: nn.Module, step: str, **what) -> None:
    """Append one step ("prepare" with its sites, or "collapse" with the block names) to the model's record."""
    config = _config(model)
    if config is None:
        return
    record = getattr(config, KEY, None) or {"version": VERSION, "model": type(model).__name__, "steps": []}
    record["steps"].append({"step": step, **what})
    setattr(config, KEY, record)


def site_entry(site: Site, slopes: int, verified: bool) -> dict:
    """One prepared site as JSON: its modules, and the slope count the PReLU was made with."""
    entry = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(site).items()}
    return {**entry, "slopes": slopes, "verified": verified}


def _site(entry: dict) -> Site:
    fields = {f.name for f in dataclasses.fields(Site)}
    return Site(**{k: tuple(v) if isinstance(v, list) else v for k, v in entry.items() if k in fields})


def replay(model: nn.Module, record: dict) -> None:
    """Make `model` (just built from the config, weights not loaded yet) have the modules the record's steps
    made: the same PReLUs at the same sites, the same fused layers in place of collapsed blocks."""
    from lc_onnx.train.collapse import fuse_blocks  # they note into the record: imported late
    from lc_onnx.train.prepare import install, no_fused_feed_forward

    if record.get("version") != VERSION:
        raise ValueError(f"from_pretrained: the folder's lc_onnx record is version {record.get('version')!r}; this "
                         f"lc-onnx reads version {VERSION} (upgrade lc-onnx)")
    for step in record["steps"]:
        if step["step"] == "prepare":
            for entry in step["sites"]:
                # the recorded slope count decides the PReLU's size (the weights come after): never the count an
                # nn.PReLU already at the site would give with keep_slopes
                install(model, _site(entry), per_channel=entry["slopes"] > 1, verified=entry["verified"],
                        keep_slopes=False)
            no_fused_feed_forward(model)
        elif step["step"] == "collapse":
            fuse_blocks(model, step["blocks"])
        else:
            raise ValueError(f"from_pretrained: unknown step {step['step']!r} in the folder's lc_onnx record")


def _target(model: nn.Module, record: dict) -> nn.Module:
    """The module the record was written for: the model, or the submodule of its class (a record written by
    `prepare(model.bert, ...)` lies in the config the whole model shares)."""
    if type(model).__name__ == record.get("model"):
        return model
    for m in model.modules():
        if type(m).__name__ == record.get("model"):
            return m
    raise ValueError(f"from_pretrained: the folder's lc_onnx record was written for a {record.get('model')}, and "
                     f"the {type(model).__name__} built from it holds none")


def from_pretrained(model_class, folder: str | os.PathLike, **kwargs) -> nn.Module:
    """`model_class.from_pretrained(folder, **kwargs)` for a model saved after `prepare` and/or `collapse`: the
    prepared PReLUs and fused layers are rebuilt from the record in its config.json, then the weights are loaded,
    and any weight missing, unexpected or of another shape is a ValueError. A folder without a record loads as
    transformers loads it (nothing was prepared)."""
    config = kwargs.pop("config", None)
    if config is None:
        config = model_class.config_class.from_pretrained(folder, **{k: v for k, v in kwargs.items()
                                                                     if k in ("revision", "trust_remote_code")})
    record = getattr(config, KEY, None)
    if not record:
        return model_class.from_pretrained(folder, config=config, **kwargs)

    def __init__(self, *args, **kw):
        model_class.__init__(self, *args, **kw)
        replay(_target(self, record), record)

    # a subclass only while transformers builds it (the replay must run between building and loading); the
    # model returned is of `model_class` itself, so it pickles and saves under its own name
    rebuilt = type(model_class.__name__, (model_class,), {"__init__": __init__, "__module__": model_class.__module__})
    model, info = rebuilt.from_pretrained(folder, config=config, output_loading_info=True, **kwargs)
    model.__class__ = model_class
    wrong = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if wrong:
        listed = "; ".join(f"{k.replace('_', ' ')}: {', '.join(map(str, sorted(v)[:3]))}"
                           + (f" and {len(v) - 3} more" if len(v) > 3 else "") for k, v in wrong.items())
        raise ValueError(f"from_pretrained: the weights in {folder} do not fit the model its lc_onnx record rebuilds "
                         f"({listed}); the folder was changed after save_pretrained, or saved by another version")
    return model
