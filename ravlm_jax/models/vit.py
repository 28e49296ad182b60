"""The CLIP vision tower (Hugging Face ``CLIPVisionModel``) as an NNX module.

Patches are embedded by one einsum over non-overlapping ``patch x patch`` tiles, which is
exactly the stride-``patch`` convolution CLIP uses (no bias) without a conv op. The kernel is
kept in conv layout ``[p, p, channels, width]`` so its logical axes read like a conv's.

``ViT(pixels)`` returns ``(tokens, pooled)``: ``tokens`` is ``last_hidden_state`` (no
post-layernorm; SmallCap's decoder attends to it) and ``pooled`` is ``post_layernorm(CLS)``
(HF ``pooler_output``, what the CLIP projection consumes).
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
    einsum,
    materialize_grad,
    normal,
    param,
)
from ravlm_jax.sharding import constrain

ACTIVATIONS_AXES = ("batch", "length", "embed")

# Hugging Face CLIPVisionConfig defaults, for config.json files that omit a field.
_HF_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                           num_attention_heads=12, num_channels=3, image_size=224,
                           patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    mlp_dim: int
    act: str = "quick_gelu"
    eps: float = 1e-5
    num_channels: int = 3

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size "
                             f"{self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by {self.heads} heads")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid ** 2

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> ViTConfig:
        """From a ``CLIPVisionConfig`` dict; a full ``CLIPConfig`` dict (with
        ``vision_config``) is accepted too, as SmallCap stores one under ``encoder``."""
        if "vision_config" in cfg:
            cfg = cfg["vision_config"] or {}
        c = {**_HF_VISION_DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
        return cls(image_size=int(c["image_size"]), patch_size=int(c["patch_size"]),
                   width=int(c["hidden_size"]), layers=int(c["num_hidden_layers"]),
                   heads=int(c["num_attention_heads"]), mlp_dim=int(c["intermediate_size"]),
                   act=str(c["hidden_act"]), eps=float(c["layer_norm_eps"]),
                   num_channels=int(c["num_channels"]))


class PreLNEncoderLayer(nnx.Module):
    """CLIP's encoder layer: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``. Shared by the
    vision and the CLIP text tower."""

    def __init__(self, width: int, heads: int, mlp_dim: int, act: str, eps: float, *,
                 rngs: nnx.Rngs, dtype: DType = jnp.float32):
        self.norm1 = LayerNorm(width, eps=eps, rngs=rngs, dtype=dtype)
        self.attn = Attention(width, width, heads, rngs=rngs, dtype=dtype)
        self.norm2 = LayerNorm(width, eps=eps, rngs=rngs, dtype=dtype)
        self.mlp = MLP(width, mlp_dim, act, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        x = materialize_grad(x)  # the residual gradient is computed once per block
        x = x + self.attn(self.norm1(x), mask=mask)  # [B, T, W]
        x = constrain(x, ACTIVATIONS_AXES)
        x = x + self.mlp(self.norm2(x))
        return constrain(x, ACTIVATIONS_AXES)


class ViT(nnx.Module):
    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs, dtype: DType = jnp.float32):
        c = self.config = config
        self.dtype = dtype
        self.patch_embed = param(rngs, normal(0.02),
                                 (c.patch_size, c.patch_size, c.num_channels, c.width),
                                 ("conv", "conv", "channels", "embed"))
        self.class_embedding = param(rngs, normal(c.width ** -0.5), (c.width,), ("embed",))
        self.position_embedding = Embed(c.num_patches + 1, c.width, axes=(None, "embed"),
                                        rngs=rngs, dtype=dtype)
        self.pre_norm = LayerNorm(c.width, eps=c.eps, rngs=rngs, dtype=dtype)
        self.layers = nnx.List([
            PreLNEncoderLayer(c.width, c.heads, c.mlp_dim, c.act, c.eps, rngs=rngs, dtype=dtype)
            for _ in range(c.layers)])
        self.post_norm = LayerNorm(c.width, eps=c.eps, rngs=rngs, dtype=dtype)

    def _check(self, pixels: jax.Array) -> None:
        c = self.config
        want = (c.image_size, c.image_size, c.num_channels)
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != want:
            raise ValueError(f"ViT expects NHWC pixels [B, {want[0]}, {want[1]}, {want[2]}], "
                             f"got shape {tuple(pixels.shape)}")

    def embed(self, pixels: jax.Array) -> jax.Array:
        """[B, H, W, C] -> [B, 1 + P, W]: patch embeddings, CLS, positions."""
        self._check(pixels)
        c = self.config
        b, g, p = pixels.shape[0], c.grid, c.patch_size
        tiles = pixels.astype(self.dtype).reshape(b, g, p, g, p, c.num_channels)
        # [B, gh, p, gw, p, C] x [p, p, C, W] -> [B, gh, gw, W]: conv with stride = kernel
        patches = einsum("bhpwqc,pqcd->bhwd", tiles, self.patch_embed[...], self.dtype)
        patches = patches.reshape(b, c.num_patches, c.width)  # row-major grid, as HF flattens
        cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (b, 1, c.width))
        x = jnp.concatenate([cls, patches], axis=1)  # [B, 1 + P, W]
        x = x + self.position_embedding.embedding[...].astype(self.dtype)[None]
        return constrain(x, ACTIVATIONS_AXES)

    def __call__(self, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
        """pixels [B, H, W, C] float -> (tokens [B, 1 + P, W], pooled [B, W])."""
        x = self.pre_norm(self.embed(pixels))
        for layer in self.layers:
            x = layer(x)
        return x, self.post_norm(x[:, 0])
