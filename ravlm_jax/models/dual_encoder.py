"""The dual encoder ``E(text, image)``: any image tower + any text tower -> one unit vector.

Towers return ``(tokens [B, T, W], pooled [B, W])``. Each pooled vector is projected to the
shared space and L2-normalised: ``u_img``, ``u_txt`` (``[B, D]`` unit). The query is

* image only (no text tokens in a row): ``q = u_img``
* text only (no image): ``q = u_txt``
* both: ``q = normalize(u_img + w * u_txt + F([u_img; u_txt]))``

where ``w = softplus(text_weight)`` is a learned scalar (starting at 1: the average of the two
directions) and ``F`` is a linear correction initialised at zero, so an untrained fusion is the
plain sum and training can only improve it. Rows are handled independently: in one batch some
rows may carry text (the caption generated so far) and others not, which is what the
generation loop needs at its first chunk.

Datastore keys are built with the same functions (``encode_text`` for caption datastores,
``encode_query`` for (text, image) pairs), so every key and query live in one space and cosine
similarity is a dot product.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from ravlm_jax.models.layers import Linear, param
from ravlm_jax.sharding import constrain


@dataclass(frozen=True)
class DualEncoderConfig:
    image_width: int
    text_width: int
    embed_dim: int = 256
    proj_bias: bool = True
    fusion: bool = True                 # learn F; False: q = normalize(u_img + w u_txt)
    logit_scale_init: float = math.log(1 / 0.07)  # CLIP
    siglip_bias_init: float = -10.0     # SigLIP


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), eps))


class DualEncoder(nnx.Module):
    def __init__(self, image_tower: nnx.Module, text_tower: nnx.Module,
                 config: DualEncoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.image_tower = image_tower
        self.text_tower = text_tower
        d = config.embed_dim
        self.image_proj = Linear(config.image_width, d, axes=("embed", None),
                                 use_bias=config.proj_bias, rngs=rngs,
                                 init_std=config.image_width ** -0.5)
        self.text_proj = Linear(config.text_width, d, axes=("embed", None),
                                use_bias=config.proj_bias, rngs=rngs,
                                init_std=config.text_width ** -0.5)
        self.text_weight = param(rngs, jax.nn.initializers.constant(math.log(math.e - 1)),
                                 (), ())  # softplus(.) = 1
        self.fusion = (Linear(2 * d, d, axes=(None, None), rngs=rngs, init_std=0.0)
                       if config.fusion else None)
        self.logit_scale = param(rngs, jax.nn.initializers.constant(config.logit_scale_init),
                                 (), ())
        self.logit_bias = param(rngs, jax.nn.initializers.constant(config.siglip_bias_init),
                                (), ())

    # ------------------------------------------------------------------ towers
    def image_features(self, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
        """pixels [B, H, W, 3] -> (tokens [B, T, Wi], pooled [B, Wi])."""
        tokens, pooled = self.image_tower(pixels)
        return constrain(tokens, ("batch", "length", "embed")), pooled

    def image_tokens(self, pixels: jax.Array) -> jax.Array:
        """What the decoder cross-attends to: [B, T, Wi]."""
        return self.image_features(pixels)[0]

    def text_features(self, ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """ids, mask [B, L] -> (tokens [B, L, Wt], pooled [B, Wt])."""
        return self.text_tower(ids, mask)

    # ------------------------------------------------------------------ embeddings
    def embed_image_pooled(self, pooled: jax.Array) -> jax.Array:
        return l2_normalize(self.image_proj(pooled))  # [B, Wi] -> [B, D]

    def embed_text_pooled(self, pooled: jax.Array) -> jax.Array:
        return l2_normalize(self.text_proj(pooled))  # [B, Wt] -> [B, D]

    def encode_image(self, pixels: jax.Array) -> jax.Array:
        """[B, H, W, 3] -> [B, D] unit float32."""
        return self.embed_image_pooled(self.image_features(pixels)[1])

    def encode_text(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        """[B, L] -> [B, D] unit float32."""
        return self.embed_text_pooled(self.text_features(ids, mask)[1])

    def fuse(self, u_img: jax.Array, u_txt: jax.Array, has_text: jax.Array) -> jax.Array:
        """u_img, u_txt [B, D] unit, has_text [B] bool -> q [B, D] unit."""
        w = jax.nn.softplus(self.text_weight[...])
        both = u_img + w * u_txt
        if self.fusion is not None:
            both = both + self.fusion(jnp.concatenate([u_img, u_txt], -1))  # [B, 2D] -> [B, D]
        return jnp.where(has_text[:, None], l2_normalize(both), u_img)

    def encode_query(self, ids: jax.Array | None, mask: jax.Array | None,
                     pixels: jax.Array | None) -> jax.Array:
        """``E(text, image)`` -> [B, D] unit. Either input may be None; rows whose mask is
        all zero count as image-only."""
        if pixels is None and ids is None:
            raise ValueError("encode_query needs text, an image, or both")
        if pixels is None:
            return self.encode_text(ids, mask)
        u_img = self.encode_image(pixels)
        if ids is None:
            return u_img
        u_txt = self.encode_text(ids, mask)
        return self.fuse(u_img, u_txt, mask.sum(-1) > 0)

    # ------------------------------------------------------------------ losses
    def contrastive_loss(self, u_img: jax.Array, u_txt: jax.Array, kind: str = "clip"
                         ) -> jax.Array:
        if kind == "clip":
            return clip_loss(u_img, u_txt, self.logit_scale[...])
        if kind == "siglip":
            return siglip_loss(u_img, u_txt, self.logit_scale[...], self.logit_bias[...])
        raise ValueError(f"unknown contrastive loss {kind!r}; use 'clip' or 'siglip'")


def clip_loss(a: jax.Array, b: jax.Array, log_scale: jax.Array, max_scale: float = 100.0
              ) -> jax.Array:
    """Symmetric InfoNCE over in-batch negatives; row i of ``a`` matches row i of ``b``.
    a, b: [B, D] unit. The temperature is clamped at 100 as in CLIP."""
    scale = jnp.minimum(jnp.exp(log_scale), max_scale)
    logits = scale * jnp.einsum("id,jd->ij", a, b)  # [B, B]
    labels = jnp.arange(a.shape[0])
    lp_ab = jax.nn.log_softmax(logits, axis=1)
    lp_ba = jax.nn.log_softmax(logits, axis=0)
    return -0.5 * (lp_ab[labels, labels].mean() + lp_ba[labels, labels].mean())


def siglip_loss(a: jax.Array, b: jax.Array, log_scale: jax.Array, bias: jax.Array
                ) -> jax.Array:
    """SigLIP pairwise sigmoid loss: every (i, j) pair is a binary problem, +1 on the
    diagonal; summed over j and averaged over i as in the paper. a, b: [B, D] unit."""
    logits = jnp.exp(log_scale) * jnp.einsum("id,jd->ij", a, b) + bias  # [B, B]
    labels = 2.0 * jnp.eye(a.shape[0]) - 1.0
    return -jax.nn.log_sigmoid(labels * logits).sum(-1).mean()
