"""Hugging Face BERT checkpoints (``BertModel``, e.g. all-MiniLM-L6-v2) -> :class:`Bert`.

Keys (optionally under ``bert.``, as in ``BertForMaskedLM``): ``embeddings.{word,position,
token_type}_embeddings.weight``, ``embeddings.LayerNorm``, ``encoder.layer.N.attention.self.
{query,key,value}``, ``...attention.output.{dense,LayerNorm}``, ``...intermediate.dense``,
``...output.{dense,LayerNorm}`` and, when shipped, ``pooler.dense``. Pre-2019 checkpoints
name LayerNorm parameters ``gamma``/``beta``; those are renamed. The pooler is loaded when
the checkpoint has it, unless ``pooler=False`` asks to drop it (logged, never silent).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from ravlm_jax.checkpoints.clip import build, check_consumed, skip_buffers
from ravlm_jax.checkpoints.io import (
    CheckpointError,
    KeyMapper,
    load_state_dict,
    read_config,
    resolve,
)
from ravlm_jax.models.layers import DType
from ravlm_jax.models.text import Bert, BertConfig

log = logging.getLogger(__name__)

BERT_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")
POOLER = "pooler.dense"


def _legacy_names(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``LayerNorm.gamma/beta`` (TF-converted BERT) -> ``LayerNorm.weight/bias``."""
    out = {}
    for k, v in state_dict.items():
        if ".LayerNorm." in k and k.endswith((".gamma", ".beta")):
            k = k.rsplit(".", 1)[0] + (".weight" if k.endswith(".gamma") else ".bias")
        out[k] = v
    return out


def bert_prefix(state_dict: Mapping[str, np.ndarray]) -> str:
    for prefix in ("", "bert."):
        if f"{prefix}embeddings.word_embeddings.weight" in state_dict:
            return prefix
    raise CheckpointError("no BERT weights found (expected embeddings.word_embeddings.weight, "
                          "optionally under bert.)")


def bert_arrays(config: BertConfig, m: KeyMapper) -> dict[str, np.ndarray]:
    m.put("word_embeddings.embedding", m.get("embeddings.word_embeddings.weight"))
    m.put("position_embeddings.embedding", m.get("embeddings.position_embeddings.weight"))
    m.put("token_type_embeddings.embedding", m.get("embeddings.token_type_embeddings.weight"))
    m.layer_norm("embed_norm", "embeddings.LayerNorm")
    for i in range(config.layers):
        o, t = f"layers.{i}", f"encoder.layer.{i}"
        m.linear(f"{o}.attn.query", f"{t}.attention.self.query")
        m.linear(f"{o}.attn.key", f"{t}.attention.self.key")
        m.linear(f"{o}.attn.value", f"{t}.attention.self.value")
        m.linear(f"{o}.attn.out", f"{t}.attention.output.dense")
        m.layer_norm(f"{o}.attn_norm", f"{t}.attention.output.LayerNorm")
        m.linear(f"{o}.mlp.fc1", f"{t}.intermediate.dense")
        m.linear(f"{o}.mlp.fc2", f"{t}.output.dense")
        m.layer_norm(f"{o}.mlp_norm", f"{t}.output.LayerNorm")
    if config.pooler:
        m.linear("pooler", POOLER)
    skip_buffers(m, BERT_BUFFERS)
    return m.out


def bert_from_state_dict(cfg_dict: Mapping[str, Any], state_dict: Mapping[str, np.ndarray],
                         prefix: str | None = None, dtype: DType = jnp.float32,
                         pooler: bool | None = None) -> tuple[Bert, BertConfig]:
    """A filled :class:`Bert`. ``pooler``: None follows the checkpoint, True requires the
    pooler weights, False drops them deliberately."""
    state_dict = _legacy_names(state_dict)
    prefix = bert_prefix(state_dict) if prefix is None else prefix
    m = KeyMapper(state_dict, prefix)
    has_pooler = m.has(f"{POOLER}.weight")
    if pooler and not has_pooler:
        raise CheckpointError(f"pooler=True but the checkpoint has no {prefix}{POOLER}.weight")
    if pooler is False and has_pooler:
        log.info("dropping the checkpoint's BERT pooler (pooler=False)")
        for name in (f"{POOLER}.weight", f"{POOLER}.bias"):
            if m.has(name):
                m.get(name)
    config = BertConfig.from_hf(cfg_dict, pooler=has_pooler if pooler is None else pooler)
    arrays = bert_arrays(config, m)
    check_consumed(m, "BERT checkpoint")
    outside = [k for k in state_dict if not k.startswith(prefix)]
    if outside:
        log.info("BERT checkpoint: ignoring %d tensors outside %r (task heads), e.g. %s",
                 len(outside), prefix, outside[:3])
    model = build(Bert, config, arrays, dtype, f"BERT checkpoint (prefix {prefix!r})")
    return model, config


def load_bert(name_or_path: str | os.PathLike, dtype: DType = jnp.float32,
              pooler: bool | None = None) -> tuple[Bert, BertConfig]:
    """A BertModel directory (or a sentence-transformers one) or hub id -> (Bert, config)."""
    directory = resolve(name_or_path)
    cfg = read_config(directory)
    if cfg.get("model_type", "bert") != "bert":
        raise CheckpointError(f"{directory}/config.json has model_type "
                              f"{cfg.get('model_type')!r}, expected 'bert'")
    return bert_from_state_dict(cfg, load_state_dict(directory), None, dtype, pooler)
