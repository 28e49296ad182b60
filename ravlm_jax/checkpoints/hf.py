"""One entry point for Hugging Face checkpoints: ``load_pretrained(dir_or_hub_id)``.

Dispatches on ``config.json``'s ``model_type`` to the per-architecture loaders, each of
which maps names torch-free and checks every tensor (missing, unexpected or misshapen
tensors are errors, never silently random weights):

=====================  =========================================  ==================
model_type             returns ``Pretrained.modules``              loader
=====================  =========================================  ==================
clip                   vision (ViT), text (CLIPText); projections  checkpoints.clip
clip_vision_model      vision (ViT)                                checkpoints.clip
bert                   text (Bert)                                 checkpoints.bert
gpt2                   decoder (Decoder)                           checkpoints.gpt2
smallcap               vision (ViT), decoder (Decoder)             checkpoints.smallcap
=====================  =========================================  ==================

A hub id (``org/name``) is fetched with huggingface_hub (or read from its cache when
``HF_HUB_OFFLINE=1``); a local directory is used as is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import jax.numpy as jnp
from flax import nnx

from ravlm_jax.checkpoints.io import CheckpointError, param_counts, read_config, resolve


@dataclass
class Pretrained:
    model_type: str
    modules: dict[str, nnx.Module]
    extras: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)

    def summary(self) -> str:
        parts = [f"{name}: {c['total']:,} params ({c['trainable']:,} trainable, "
                 f"{c['frozen']:,} frozen)" for name, c in self.counts.items()]
        return f"{self.model_type}: " + "; ".join(parts)


def load_pretrained(name_or_path: str | os.PathLike, dtype: Any = jnp.float32) -> Pretrained:
    directory = resolve(name_or_path)
    if not directory.is_dir():
        raise CheckpointError(f"{name_or_path} is not a checkpoint directory")
    model_type = read_config(directory).get("model_type")
    frozen = None
    if model_type == "clip":
        from ravlm_jax.checkpoints.clip import load_clip

        vision, text, extras = load_clip(directory, dtype)
        out = Pretrained(model_type, {"vision": vision, "text": text}, extras)
    elif model_type == "clip_vision_model":
        from ravlm_jax.checkpoints.clip import load_clip_vision

        out = Pretrained(model_type, {"vision": load_clip_vision(directory, dtype)})
    elif model_type == "bert":
        from ravlm_jax.checkpoints.bert import load_bert

        out = Pretrained(model_type, {"text": load_bert(directory, dtype)[0]})
    elif model_type == "gpt2":
        from ravlm_jax.checkpoints.gpt2 import load_gpt2

        out = Pretrained(model_type, {"decoder": load_gpt2(directory, dtype)[0]})
    elif model_type == "smallcap":
        from ravlm_jax.checkpoints.smallcap import load_smallcap, smallcap_frozen

        vision, decoder, info = load_smallcap(directory, dtype)
        out = Pretrained(model_type, {"vision": vision, "decoder": decoder}, info)
        frozen = {"vision": lambda path: True, "decoder": smallcap_frozen}
    else:
        raise CheckpointError(f"{directory}: unsupported model_type {model_type!r} (supported: "
                              "clip, clip_vision_model, bert, gpt2, smallcap)")
    for name, module in out.modules.items():
        out.counts[name] = param_counts(module, None if frozen is None else frozen[name])
    return out
