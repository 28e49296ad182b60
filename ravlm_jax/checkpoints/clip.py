"""Hugging Face CLIP checkpoints -> :class:`ViT`, :class:`CLIPText` and the projections.

Key layout of a ``CLIPVisionTransformer`` under some prefix (``vision_model.`` in a
``CLIPModel``, ``encoder.`` in SmallCap, empty or ``vision_model.`` in a ``CLIPVisionModel``):
``embeddings.{class_embedding, patch_embedding.weight, position_embedding.weight}``,
``pre_layrnorm.*``, ``encoder.layers.N.{self_attn.{q,k,v,out}_proj, layer_norm1, mlp.fc1,
mlp.fc2, layer_norm2}``, ``post_layernorm.*``. The text tower (``text_model.`` in a
``CLIPModel``) has ``embeddings.{token_embedding, position_embedding}.weight``, the same
encoder layers and ``final_layer_norm.*``. The non-persistent ``position_ids`` buffer
that old checkpoints carry is skipped by name; anything else left over is an error.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ravlm_jax.checkpoints.io import (
    CheckpointError,
    KeyMapper,
    fill_module,
    load_state_dict,
    param_counts,
    read_config,
    resolve,
)
from ravlm_jax.models.layers import DType
from ravlm_jax.models.text import CLIPText, CLIPTextConfig
from ravlm_jax.models.vit import ViT, ViTConfig

log = logging.getLogger(__name__)

# Buffers, not parameters: present in older checkpoints, recomputed by the model.
BUFFERS = ("embeddings.position_ids",)


def skip_buffers(m: KeyMapper, names: tuple[str, ...] = BUFFERS) -> None:
    """Mark known non-parameter buffers as consumed so leftovers are only real surprises."""
    for name in names:
        if m.has(name):
            m.get(name)


def check_consumed(m: KeyMapper, what: str) -> None:
    left = m.unused()
    if left:
        raise CheckpointError(f"{what}: {len(left)} unexpected tensors under "
                              f"{m.prefix!r}: {left[:6]}{'...' if len(left) > 6 else ''}")


def map_pre_ln_layers(m: KeyMapper, ours: str, theirs: str, n: int) -> None:
    """CLIPEncoderLayer N -> PreLNEncoderLayer N (vision and text share the layout)."""
    for i in range(n):
        o, t = f"{ours}.{i}", f"{theirs}.{i}"
        m.layer_norm(f"{o}.norm1", f"{t}.layer_norm1")
        m.linear(f"{o}.attn.query", f"{t}.self_attn.q_proj")
        m.linear(f"{o}.attn.key", f"{t}.self_attn.k_proj")
        m.linear(f"{o}.attn.value", f"{t}.self_attn.v_proj")
        m.linear(f"{o}.attn.out", f"{t}.self_attn.out_proj")
        m.layer_norm(f"{o}.norm2", f"{t}.layer_norm2")
        m.linear(f"{o}.mlp.fc1", f"{t}.mlp.fc1")
        m.linear(f"{o}.mlp.fc2", f"{t}.mlp.fc2")


def vision_arrays(config: ViTConfig, m: KeyMapper) -> dict[str, np.ndarray]:
    """``{our path: array}`` for a ViT from CLIPVisionTransformer keys under ``m.prefix``."""
    m.put("class_embedding", m.get("embeddings.class_embedding"))
    # torch conv weight [W, C, p, p] -> our [p, p, C, W]
    m.put("patch_embed", m.get("embeddings.patch_embedding.weight").transpose(2, 3, 1, 0))
    m.put("position_embedding.embedding", m.get("embeddings.position_embedding.weight"))
    m.layer_norm("pre_norm", "pre_layrnorm")
    map_pre_ln_layers(m, "layers", "encoder.layers", config.layers)
    m.layer_norm("post_norm", "post_layernorm")
    skip_buffers(m)
    return m.out


def vision_from_state_dict(cfg_dict: Mapping[str, Any], state_dict: Mapping[str, np.ndarray],
                           prefix: str = "vision_model.", dtype: DType = jnp.float32) -> ViT:
    """A filled :class:`ViT` from a state dict whose vision keys sit under ``prefix``.

    ``cfg_dict`` is a CLIPVisionConfig dict (or a CLIPConfig dict with ``vision_config``).
    Every tensor under ``prefix`` must be used; keys outside it are ignored, so a SmallCap
    or CLIPModel state dict can be passed whole.
    """
    config = ViTConfig.from_hf(cfg_dict)
    m = KeyMapper(state_dict, prefix)
    arrays = vision_arrays(config, m)
    check_consumed(m, "CLIP vision checkpoint")
    return build(ViT, config, arrays, dtype, f"CLIP vision checkpoint (prefix {prefix!r})")


def build(cls: type[nnx.Module], config: Any, arrays: Mapping[str, np.ndarray], dtype: DType,
          what: str) -> Any:
    """Abstract module (no random init) filled from ``arrays``, shape-checked."""
    abstract = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0), dtype=dtype))
    module = fill_module(abstract, arrays, what=what)
    log.info("%s %s: %s", cls.__name__, config, param_counts(module))
    return module


def text_arrays(config: CLIPTextConfig, m: KeyMapper) -> dict[str, np.ndarray]:
    """``{our path: array}`` for a CLIPText from CLIPTextModel keys under ``m.prefix``."""
    m.put("token_embedding.embedding", m.get("embeddings.token_embedding.weight"))
    m.put("position_embedding.embedding", m.get("embeddings.position_embedding.weight"))
    map_pre_ln_layers(m, "layers", "encoder.layers", config.layers)
    m.layer_norm("final_norm", "final_layer_norm")
    skip_buffers(m)
    return m.out


def text_from_state_dict(cfg_dict: Mapping[str, Any], state_dict: Mapping[str, np.ndarray],
                         prefix: str = "text_model.", dtype: DType = jnp.float32) -> CLIPText:
    """A filled :class:`CLIPText`; ``cfg_dict`` is a CLIPTextConfig or CLIPConfig dict."""
    config = CLIPTextConfig.from_hf(cfg_dict)
    m = KeyMapper(state_dict, prefix)
    arrays = text_arrays(config, m)
    check_consumed(m, "CLIP text checkpoint")
    return build(CLIPText, config, arrays, dtype, f"CLIP text checkpoint (prefix {prefix!r})")


def _vision_prefix(state_dict: Mapping[str, np.ndarray]) -> str:
    """``vision_model.`` (CLIPModel, transformers 4 CLIPVisionModel) or none (a bare
    CLIPVisionTransformer layout)."""
    if any(k.startswith("vision_model.") for k in state_dict):
        return "vision_model."
    if "embeddings.class_embedding" in state_dict:
        return ""
    raise CheckpointError("no CLIP vision weights found (expected vision_model.embeddings.* "
                          "or embeddings.class_embedding)")


def load_clip_vision(name_or_path: str | os.PathLike, dtype: DType = jnp.float32) -> ViT:
    """A CLIPVisionModel (or the vision half of a CLIPModel) directory or hub id -> ViT."""
    directory = resolve(name_or_path)
    cfg = read_config(directory)
    state_dict = load_state_dict(directory)
    return vision_from_state_dict(cfg, state_dict, _vision_prefix(state_dict), dtype)


CLIP_TOWERS = ("vision_model.", "text_model.")


def load_clip(name_or_path: str | os.PathLike, dtype: DType = jnp.float32
              ) -> tuple[ViT, CLIPText, dict[str, Any]]:
    """A CLIPModel directory or hub id -> ``(vision, text, extras)``.

    ``extras``: ``visual_projection`` [W_v, P] and ``text_projection`` [W_t, P] kernels
    (numpy, ``[in, out]``: ``embeds = pooled @ kernel``), and ``logit_scale`` (a float, the
    log of CLIP's inverse temperature; logits use ``exp(logit_scale)``).
    """
    directory = resolve(name_or_path)
    cfg = read_config(directory)
    if "vision_config" not in cfg or "text_config" not in cfg:
        raise CheckpointError(f"{directory}/config.json is not a CLIPModel config (needs "
                              "vision_config and text_config)")
    state_dict = load_state_dict(directory)
    vision = vision_from_state_dict(cfg, state_dict, "vision_model.", dtype)
    text = text_from_state_dict(cfg, state_dict, "text_model.", dtype)
    m = KeyMapper(state_dict)
    extras = {"visual_projection": m.get("visual_projection.weight").T,  # [P, W_v] -> [W_v, P]
              "text_projection": m.get("text_projection.weight").T,  # [P, W_t] -> [W_t, P]
              "logit_scale": float(m.get("logit_scale"))}
    left = [k for k in m.unused() if not k.startswith(CLIP_TOWERS)]
    if left:
        raise CheckpointError(f"CLIP checkpoint has unexpected tensors {left[:6]}")
    return vision, text, extras
