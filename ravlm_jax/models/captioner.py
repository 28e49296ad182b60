"""The retrieval-augmented captioner: dual encoder + decoder + the memory it attends to.

The decoder's cross-attention memory is ``[image tokens ; retrieved neighbours]``:

* image tokens ``[B, Ti, Wi]`` from the image tower, through a LayerNorm + linear adapter;
* each retrieved caption (``k`` of them, ``Ln`` decoder-vocabulary tokens each) embedded
  with the decoder's own token embedding (a retrieved word and a generated word share one
  vector, so copying is easy), plus a position and a slot embedding, then a few
  pre-LN transformer layers within each neighbour.

Generation retrieves again after every chunk of ``chunk_len`` tokens and replaces the
neighbour part of the memory. Training shows the decoder the same thing in one pass: the
memory holds the neighbours of every chunk, and a per-position mask lets the token at
position ``t`` see the image and the neighbours of chunk ``t // chunk_len`` only
(the RETRO-style chunked cross-attention layout). So the teacher-forced logits equal the
logits of the chunked generation loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from ravlm_jax.models.decoder import Decoder
from ravlm_jax.models.dual_encoder import DualEncoder
from ravlm_jax.models.layers import Embed, LayerNorm, Linear
from ravlm_jax.models.vit import PreLNEncoderLayer
from ravlm_jax.sharding import constrain


@dataclass(frozen=True)
class CaptionerConfig:
    image_width: int                 # width of the image tower's tokens
    k_max: int = 8                   # neighbour slots in the memory
    neighbour_len: int = 16          # tokens kept per retrieved caption
    neighbour_layers: int = 1        # transformer layers within each neighbour
    neighbour_heads: int = 4
    chunk_len: int = 4               # tokens generated between two retrievals
    use_image_tokens: bool = True


class Captioner(nnx.Module):
    def __init__(self, encoder: DualEncoder, decoder: Decoder, config: CaptionerConfig, *,
                 rngs: nnx.Rngs):
        if not decoder.cfg.cross_attention:
            raise ValueError("the captioner's decoder needs cross_attention=True")
        self.config = config
        self.encoder = encoder
        self.decoder = decoder
        wd, wm = decoder.cfg.width, decoder.cfg.memory_width
        self.image_norm = LayerNorm(config.image_width, rngs=rngs)
        self.image_adapter = Linear(config.image_width, wm, axes=("embed", None), rngs=rngs)
        self.neighbour_proj = (Linear(wd, wm, axes=("embed", None), rngs=rngs)
                               if wd != wm else None)
        self.neighbour_pos = Embed(config.neighbour_len, wm, axes=(None, "embed"), rngs=rngs)
        self.neighbour_slot = Embed(config.k_max, wm, axes=(None, "embed"), rngs=rngs)
        self.neighbour_layers = nnx.List([
            PreLNEncoderLayer(wm, config.neighbour_heads, 4 * wm, "gelu", 1e-5, rngs=rngs)
            for _ in range(config.neighbour_layers)])
        self.neighbour_norm = LayerNorm(wm, rngs=rngs)

    # ------------------------------------------------------------------ memory pieces
    def image_memory(self, image_tokens: jax.Array) -> jax.Array:
        """[B, Ti, Wi] -> [B, Ti, Wm]."""
        return self.image_adapter(self.image_norm(image_tokens))

    def neighbour_memory(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        """Retrieved captions ids, mask [B, k, Ln] (decoder vocab) -> [B, k*Ln, Wm]."""
        b, k, ln = ids.shape
        if k > self.config.k_max or ln > self.config.neighbour_len:
            raise ValueError(f"neighbours [{k}, {ln}] exceed k_max={self.config.k_max}, "
                             f"neighbour_len={self.config.neighbour_len}")
        x = self.decoder.wte(ids)  # [B, k, Ln, Wd]
        if self.neighbour_proj is not None:
            x = self.neighbour_proj(x)  # [B, k, Ln, Wm]
        x = (x + self.neighbour_pos.embedding[...][:ln]
             + self.neighbour_slot.embedding[...][:k, None, :])
        x = x.reshape(b * k, ln, -1)  # [B*k, Ln, Wm]: attention within each neighbour
        tok_mask = mask.reshape(b * k, ln).astype(bool)
        attn_mask = tok_mask[:, None, None, :]  # [B*k, 1, 1, Ln]
        for layer in self.neighbour_layers:
            x = layer(x, attn_mask)
        x = self.neighbour_norm(x)
        return constrain(x.reshape(b, k * ln, -1), ("batch", "length", "embed"))

    def chunk_memory(self, image_mem: jax.Array | None, ids: jax.Array, mask: jax.Array
                     ) -> tuple[jax.Array, jax.Array]:
        """Memory for one chunk: ([B, Ti + k*Ln, Wm], mask [B, Ti + k*Ln]). Empty
        neighbour slots (mask all zero) are masked out; k may be 0."""
        parts, masks = [], []
        if image_mem is not None:
            parts.append(image_mem)
            masks.append(jnp.ones(image_mem.shape[:2], bool))
        if ids.shape[1] > 0:
            parts.append(self.neighbour_memory(ids, mask))
            masks.append(mask.reshape(mask.shape[0], -1).astype(bool))
        if not parts:
            raise ValueError("empty memory: no image tokens and no neighbours")
        return jnp.concatenate(parts, 1), jnp.concatenate(masks, 1)

    # ------------------------------------------------------------------ teacher forcing
    def __call__(self, ids: jax.Array, image_tokens: jax.Array | None,
                 neighbour_ids: jax.Array, neighbour_mask: jax.Array, *,
                 deterministic: bool = True, rngs: nnx.Rngs | None = None) -> jax.Array:
        """Teacher-forced logits.

        ids [B, T] decoder input (BOS first); image_tokens [B, Ti, Wi] or None;
        neighbour_ids / neighbour_mask [B, C, k, Ln]: the neighbours retrieved for each of
        C chunks (chunk c covers input positions [c*chunk_len, (c+1)*chunk_len)).
        Returns logits [B, T, V].
        """
        b, t = ids.shape
        _, c, k, ln = neighbour_ids.shape
        cl = self.config.chunk_len
        if c * cl < t:
            raise ValueError(f"{c} chunks of {cl} tokens do not cover {t} positions")
        use_img = self.config.use_image_tokens and image_tokens is not None
        image_mem = self.image_memory(image_tokens) if use_img else None
        ti = 0 if image_mem is None else image_mem.shape[1]
        parts = [image_mem] if image_mem is not None else []
        if k > 0:
            # encode each chunk's neighbours independently: [B*C, k, Ln] -> [B, C*k*Ln, Wm]
            nb = self.neighbour_memory(neighbour_ids.reshape(b * c, k, ln),
                                       neighbour_mask.reshape(b * c, k, ln))
            nb = nb.reshape(b, c * k * ln, -1)
            nb_valid = neighbour_mask.reshape(b, c, k * ln).astype(bool)  # [B, C, k*Ln]
            parts.append(nb)
        if not parts:
            raise ValueError("empty memory: no image tokens and no neighbours")
        memory = jnp.concatenate(parts, 1)  # [B, M = Ti + C*k*Ln, Wm]

        chunk_of_pos = jnp.arange(t) // cl  # [T]
        masks = [jnp.ones((b, t, ti), bool)] if ti else []
        if k > 0:
            own_chunk = chunk_of_pos[:, None] == jnp.arange(c)[None, :]  # [T, C]
            # [B, T, C, k*Ln]: position t sees only chunk(t)'s valid neighbour tokens
            m = own_chunk[None, :, :, None] & nb_valid[:, None, :, :]
            masks.append(m.reshape(b, t, c * k * ln))
        memory_mask = jnp.concatenate(masks, -1)  # [B, T, M]
        logits, _ = self.decoder(ids, memory=memory, memory_mask=memory_mask,
                                 deterministic=deterministic, rngs=rngs)
        return logits
