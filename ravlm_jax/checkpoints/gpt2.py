"""Hugging Face GPT-2 checkpoints (with or without cross-attention) -> :class:`Decoder`.

Key layout of a ``GPT2LMHeadModel`` (``GPT2Model`` keys have no ``transformer.``):
``transformer.{wte,wpe,ln_f}``, ``transformer.h.N.{ln_1, attn.c_attn, attn.c_proj,
[ln_cross_attn, crossattention.q_attn, crossattention.c_attn, crossattention.c_proj], ln_2,
mlp.c_fc, mlp.c_proj}``, ``lm_head.weight`` (absent when tied to wte). GPT-2's ``Conv1D``
weights are already ``[in, out]``; the fused ``c_attn`` (q|k|v, or k|v for
cross-attention) is split along its output axis. The causal-mask buffers ``attn.bias`` /
``attn.masked_bias`` that older checkpoints carry are skipped by name.
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
from ravlm_jax.models.decoder import Decoder, DecoderConfig

log = logging.getLogger(__name__)

# Causal-mask buffers (not parameters) in checkpoints saved by transformers < 4.x / SmallCap.
BUFFERS = ("attn.bias", "attn.masked_bias", "crossattention.bias", "crossattention.masked_bias")


def _conv1d(m: KeyMapper, theirs: str, parts: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """A fused Conv1D ``[in, parts * n]`` -> ``parts`` (kernel [in, n], bias [n]) pairs."""
    w, b = m.get(f"{theirs}.weight"), m.get(f"{theirs}.bias")
    if w.shape[1] % parts or b.shape != (w.shape[1],):
        raise CheckpointError(f"{m.prefix}{theirs}: weight {w.shape} / bias {b.shape} cannot "
                              f"be split into {parts} parts")
    return list(zip(np.split(w, parts, axis=1), np.split(b, parts), strict=True))


def _put_linear(m: KeyMapper, ours: str, kernel_bias: tuple[np.ndarray, np.ndarray]) -> None:
    m.put(f"{ours}.kernel", kernel_bias[0])
    m.put(f"{ours}.bias", kernel_bias[1])


def _block_arrays(cfg: DecoderConfig, m: KeyMapper, i: int) -> None:
    o, t = f"blocks.{i}", f"h.{i}"
    for buffer in BUFFERS:
        if m.has(f"{t}.{buffer}"):
            m.get(f"{t}.{buffer}")
    m.layer_norm(f"{o}.ln_1", f"{t}.ln_1")
    for name, part in zip(("query", "key", "value"), _conv1d(m, f"{t}.attn.c_attn", 3),
                          strict=True):
        _put_linear(m, f"{o}.self_attn.{name}", part)
    m.linear(f"{o}.self_attn.out", f"{t}.attn.c_proj", transpose=False)
    if cfg.cross_attention:
        m.layer_norm(f"{o}.ln_cross_attn", f"{t}.ln_cross_attn")
        m.linear(f"{o}.cross_attn.query", f"{t}.crossattention.q_attn", transpose=False)
        key, value = _conv1d(m, f"{t}.crossattention.c_attn", 2)
        _put_linear(m, f"{o}.cross_attn.key", key)
        _put_linear(m, f"{o}.cross_attn.value", value)
        m.linear(f"{o}.cross_attn.out", f"{t}.crossattention.c_proj", transpose=False)
    m.layer_norm(f"{o}.ln_2", f"{t}.ln_2")
    m.linear(f"{o}.mlp.fc1", f"{t}.mlp.c_fc", transpose=False)
    m.linear(f"{o}.mlp.fc2", f"{t}.mlp.c_proj", transpose=False)


def _body_prefix(state_dict: Mapping[str, np.ndarray], prefix: str) -> str:
    """``{prefix}transformer.`` (GPT2LMHeadModel) or ``{prefix}`` (GPT2Model)."""
    if f"{prefix}transformer.wte.weight" in state_dict:
        return f"{prefix}transformer."
    if f"{prefix}wte.weight" in state_dict:
        return prefix
    raise CheckpointError(f"no GPT-2 weights found (expected {prefix}transformer.wte.weight "
                          f"or {prefix}wte.weight)")


def _lm_head(cfg: DecoderConfig, state_dict: Mapping[str, np.ndarray], key: str,
             body: KeyMapper) -> np.ndarray | None:
    """The untied head ``[width, vocab]``; None when tied (a stored copy is ignored, as
    Hugging Face re-ties it on load)."""
    if cfg.tie_word_embeddings:
        if key in state_dict and not np.array_equal(state_dict[key], state_dict[
                body.prefix + "wte.weight"]):
            log.warning("%s differs from wte but the config ties them: using wte", key)
        return None
    if key not in state_dict:
        raise CheckpointError(f"config has tie_word_embeddings=False but the checkpoint has "
                              f"no {key}")
    return np.asarray(state_dict[key]).T  # torch Linear [vocab, width] -> [width, vocab]


def decoder_from_state_dict(cfg: DecoderConfig, state_dict: Mapping[str, np.ndarray],
                            prefix: str = "") -> Decoder:
    """A filled :class:`Decoder` from a GPT2LMHeadModel / GPT2Model state dict whose keys sit
    under ``prefix`` (``decoder.`` in SmallCap). Every tensor under the model's prefix must
    be used; keys outside it are ignored, so a composite state dict can be passed whole."""
    m = KeyMapper(state_dict, _body_prefix(state_dict, prefix))
    m.put("wte.embedding", m.get("wte.weight"))
    m.put("wpe.embedding", m.get("wpe.weight"))
    for i in range(cfg.layers):
        _block_arrays(cfg, m, i)
    m.layer_norm("ln_f", "ln_f")
    head_key = f"{prefix}lm_head.weight"
    head = _lm_head(cfg, state_dict, head_key, m)
    if head is not None:
        m.put("lm_head.kernel", head)
    left = [k for k in m.unused() if k != head_key]
    if left:
        raise CheckpointError(f"GPT-2 checkpoint: {len(left)} unexpected tensors under "
                              f"{m.prefix!r}: {left[:6]}{'...' if len(left) > 6 else ''}")
    abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    decoder = fill_module(abstract, m.out, what=f"GPT-2 checkpoint (prefix {m.prefix!r})")
    log.info("GPT-2 decoder %s: %s", cfg, param_counts(decoder))
    return decoder


def load_gpt2(name_or_path: str | os.PathLike, dtype: Any = jnp.float32,
              **overrides: Any) -> tuple[Decoder, DecoderConfig]:
    """A Hugging Face GPT-2 directory (``model.safetensors`` or ``pytorch_model.bin``) or hub
    id -> ``(decoder, config)``. ``overrides`` go to :meth:`DecoderConfig.from_hf`
    (``dropout=0.1`` for fine-tuning, for instance)."""
    directory = resolve(name_or_path)
    hf_config = read_config(directory)
    try:
        cfg = DecoderConfig.from_hf(hf_config, dtype=dtype, **overrides)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{directory}/config.json is not a usable GPT-2 config: "
                              f"{type(e).__name__}: {e}") from e
    return decoder_from_state_dict(cfg, load_state_dict(directory)), cfg
