"""Text towers: CLIP's causal text transformer and BERT (MiniLM), as NNX modules.

Both mirror their Hugging Face counterparts (``CLIPTextModel``, ``BertModel``) so that
checkpoints load by renaming keys only, and both return ``(tokens [B, T, W], pooled [B, W])``:

* ``CLIPText``: pre-LN layers under a causal + padding mask, ``final_layer_norm``, and the
  EOS-position pooling of transformers 5 (legacy ``eos_token_id == 2`` configs take the
  argmax of the ids, as CLIP's tokenizer puts EOT at the highest id; others take the first
  position of ``eos_token_id``).
* ``Bert``: word + position + token-type embeddings and LayerNorm, post-LN layers with exact
  GELU, and the masked mean of sentence-transformers' ``Pooling`` as the pooled output;
  ``sentence_embedding`` adds the L2 normalisation all-MiniLM-L6-v2 applies.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ravlm_jax.models.layers import (
    MLP,
    Attention,
    DType,
    Embed,
    LayerNorm,
    Linear,
    causal_mask,
    padding_mask,
)
from ravlm_jax.models.vit import ACTIVATIONS_AXES, PreLNEncoderLayer
from ravlm_jax.sharding import constrain

# transformers 5 defaults, for config.json files that omit a field.
_HF_CLIP_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048,
                              num_hidden_layers=12, num_attention_heads=8,
                              max_position_embeddings=77, hidden_act="quick_gelu",
                              layer_norm_eps=1e-5, eos_token_id=49407)
_HF_BERT_DEFAULTS = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12,
                         num_attention_heads=12, intermediate_size=3072, hidden_act="gelu",
                         max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12,
                         position_embedding_type="absolute")

LEGACY_CLIP_EOS = 2  # configs saved before transformers PR #24773


def _hf_fields(cfg: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    return {**defaults, **{k: v for k, v in cfg.items() if v is not None}}


def _check_ids(ids: jax.Array, mask: jax.Array | None, max_len: int, what: str) -> None:
    if ids.ndim != 2:
        raise ValueError(f"{what} expects token ids [B, T], got shape {tuple(ids.shape)}")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"{what} expects integer token ids, got {ids.dtype}")
    if ids.shape[1] > max_len:
        raise ValueError(f"{what}: sequence length {ids.shape[1]} exceeds the "
                         f"{max_len} position embeddings")
    if mask is not None and tuple(mask.shape) != tuple(ids.shape):
        raise ValueError(f"{what}: mask shape {tuple(mask.shape)} differs from ids shape "
                         f"{tuple(ids.shape)}")


# --------------------------------------------------------------------------- CLIP text

@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int
    width: int
    layers: int
    heads: int
    mlp_dim: int
    max_len: int
    act: str = "quick_gelu"
    eps: float = 1e-5
    eos_token_id: int = 49407

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> CLIPTextConfig:
        """From a ``CLIPTextConfig`` dict, or a ``CLIPConfig`` dict with ``text_config``."""
        if "text_config" in cfg:
            cfg = cfg["text_config"] or {}
        c = _hf_fields(cfg, _HF_CLIP_TEXT_DEFAULTS)
        eos = c["eos_token_id"]
        if not isinstance(eos, int):
            raise ValueError(f"CLIP text eos_token_id must be one int, got {eos!r}")
        return cls(vocab_size=int(c["vocab_size"]), width=int(c["hidden_size"]),
                   layers=int(c["num_hidden_layers"]), heads=int(c["num_attention_heads"]),
                   mlp_dim=int(c["intermediate_size"]),
                   max_len=int(c["max_position_embeddings"]), act=str(c["hidden_act"]),
                   eps=float(c["layer_norm_eps"]), eos_token_id=eos)


class CLIPText(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, dtype: DType = jnp.float32):
        c = self.config = config
        self.token_embedding = Embed(c.vocab_size, c.width, rngs=rngs, dtype=dtype)
        self.position_embedding = Embed(c.max_len, c.width, axes=(None, "embed"), rngs=rngs,
                                        dtype=dtype)
        self.layers = nnx.List([
            PreLNEncoderLayer(c.width, c.heads, c.mlp_dim, c.act, c.eps, rngs=rngs, dtype=dtype)
            for _ in range(c.layers)])
        self.final_norm = LayerNorm(c.width, eps=c.eps, rngs=rngs, dtype=dtype)

    def eos_positions(self, ids: jax.Array) -> jax.Array:
        """[B, T] -> [B] index of the token whose state is pooled (first max, as torch)."""
        if self.config.eos_token_id == LEGACY_CLIP_EOS:
            return jnp.argmax(ids, axis=-1)
        return jnp.argmax((ids == self.config.eos_token_id).astype(jnp.int32), axis=-1)

    def __call__(self, ids: jax.Array, mask: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array]:
        """ids [B, T] int, mask [B, T] (1 = token) -> (tokens [B, T, W], pooled [B, W])."""
        _check_ids(ids, mask, self.config.max_len, "CLIPText")
        t = ids.shape[1]
        x = self.token_embedding(ids) + self.position_embedding(jnp.arange(t))[None]  # [B,T,W]
        x = constrain(x, ACTIVATIONS_AXES)
        attn_mask = causal_mask(t)  # [1, 1, T, T]
        if mask is not None:
            attn_mask = attn_mask & padding_mask(mask)  # [B, 1, T, T]
        for layer in self.layers:
            x = layer(x, attn_mask)
        x = self.final_norm(x)
        pooled = jnp.take_along_axis(x, self.eos_positions(ids)[:, None, None], axis=1)[:, 0]
        return x, pooled


# --------------------------------------------------------------------------- BERT

@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    width: int
    layers: int
    heads: int
    mlp_dim: int
    max_len: int
    type_vocab_size: int = 2
    act: str = "gelu"
    eps: float = 1e-12
    pooler: bool = False  # the tanh dense on [CLS]; only when the checkpoint ships it

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any], pooler: bool = False) -> BertConfig:
        c = _hf_fields(cfg, _HF_BERT_DEFAULTS)
        if c["position_embedding_type"] != "absolute":
            raise ValueError(f"only absolute BERT position embeddings are supported, got "
                             f"{c['position_embedding_type']!r}")
        return cls(vocab_size=int(c["vocab_size"]), width=int(c["hidden_size"]),
                   layers=int(c["num_hidden_layers"]), heads=int(c["num_attention_heads"]),
                   mlp_dim=int(c["intermediate_size"]),
                   max_len=int(c["max_position_embeddings"]),
                   type_vocab_size=int(c["type_vocab_size"]), act=str(c["hidden_act"]),
                   eps=float(c["layer_norm_eps"]), pooler=pooler)


class PostLNEncoderLayer(nnx.Module):
    """BERT's layer: ``ln(x + attn(x))`` then ``ln(x + mlp(x))``."""

    def __init__(self, width: int, heads: int, mlp_dim: int, act: str, eps: float, *,
                 rngs: nnx.Rngs, dtype: DType = jnp.float32):
        self.attn = Attention(width, width, heads, rngs=rngs, dtype=dtype)
        self.attn_norm = LayerNorm(width, eps=eps, rngs=rngs, dtype=dtype)
        self.mlp = MLP(width, mlp_dim, act, rngs=rngs, dtype=dtype)
        self.mlp_norm = LayerNorm(width, eps=eps, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        x = self.attn_norm(x + self.attn(x, mask=mask))  # [B, T, W]
        x = constrain(x, ACTIVATIONS_AXES)
        x = self.mlp_norm(x + self.mlp(x))
        return constrain(x, ACTIVATIONS_AXES)


def masked_mean(tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """[B, T, W], [B, T] -> [B, W] in float32; an all-padding row gives zeros, as
    sentence-transformers' clamp of the count to 1e-9 does."""
    m = mask.astype(jnp.float32)[..., None]  # [B, T, 1]
    total = jnp.sum(tokens.astype(jnp.float32) * m, axis=1)  # [B, W]
    return total / jnp.maximum(jnp.sum(m, axis=1), 1e-9)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """``torch.nn.functional.normalize``: divide by max(norm, eps)."""
    norm = jnp.linalg.norm(x.astype(jnp.float32), axis=-1, keepdims=True)
    return x / jnp.maximum(norm, eps)


class Bert(nnx.Module):
    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs, dtype: DType = jnp.float32):
        c = self.config = config
        self.word_embeddings = Embed(c.vocab_size, c.width, rngs=rngs, dtype=dtype)
        self.position_embeddings = Embed(c.max_len, c.width, axes=(None, "embed"), rngs=rngs,
                                         dtype=dtype)
        self.token_type_embeddings = Embed(c.type_vocab_size, c.width, axes=(None, "embed"),
                                           rngs=rngs, dtype=dtype)
        self.embed_norm = LayerNorm(c.width, eps=c.eps, rngs=rngs, dtype=dtype)
        self.layers = nnx.List([
            PostLNEncoderLayer(c.width, c.heads, c.mlp_dim, c.act, c.eps, rngs=rngs, dtype=dtype)
            for _ in range(c.layers)])
        self.pooler = (Linear(c.width, c.width, axes=("embed", None), rngs=rngs, dtype=dtype)
                       if c.pooler else None)

    def __call__(self, ids: jax.Array, mask: jax.Array | None = None,
                 token_type_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """ids, mask, token_type_ids [B, T] -> (tokens [B, T, W], masked mean [B, W])."""
        _check_ids(ids, mask, self.config.max_len, "Bert")
        if mask is None:
            mask = jnp.ones(ids.shape, jnp.int32)
        if token_type_ids is None:
            token_type_ids = jnp.zeros(ids.shape, jnp.int32)
        t = ids.shape[1]
        x = (self.word_embeddings(ids) + self.token_type_embeddings(token_type_ids)
             + self.position_embeddings(jnp.arange(t))[None])  # [B, T, W]
        x = constrain(self.embed_norm(x), ACTIVATIONS_AXES)  # [B, T, W]
        attn_mask = padding_mask(mask)  # [B, 1, 1, T]
        for layer in self.layers:
            x = layer(x, attn_mask)
        return x, masked_mean(x, mask)

    def sentence_embedding(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        """L2-normalised masked mean [B, W]: what sentence-transformers' all-MiniLM-L6-v2
        returns from ``encode``."""
        return l2_normalize(self(ids, mask)[1])

    def pooled_cls(self, tokens: jax.Array) -> jax.Array:
        """HF ``pooler_output``: tanh(dense(tokens[:, 0])) [B, W]."""
        if self.pooler is None:
            raise ValueError("this Bert has no pooler (its checkpoint shipped none)")
        return jnp.tanh(self.pooler(tokens[:, 0]))
