"""The retrieval-augmented captioner: dual encoder + decoder + the memory it attends to.

The decoder's cross-attention memory is ``[image tokens ; retrieved neighbours]``:

* image tokens ``[B, Ti, Wi]`` from the image tower, through a LayerNorm + linear adapter;
* each retrieved caption (``k`` of them, ``Ln`` decoder-vocabulary tokens each) embedded
  with the decoder's own token embedding (a retrieved word and a generated word share one
  vector, so copying is easy), plus a position and a slot embedding, then optionally a few
  pre-LN transformer layers within each neighbour (``neighbour_layers``; with none, the
  cross-attention K/V of neighbour tokens come from a per-vocabulary table, see
  :meth:`Captioner.neighbour_kv`).

With ``copy_head`` (a pointer-generator head, See et al. 2017), the output distribution mixes
the LM head's with a copy distribution over the retrieved tokens:
``p = g * softmax(logits) + (1 - g) * sum_m a[m] * onehot(id[m])``, ``a`` one attention
over the neighbour slots (the last block's cross-attention keys, a query of its own) and
``g`` a learned gate (1 where no neighbour is visible). A small decoder trained from scratch
has no prompt-copying skill like SmallCap's pretrained GPT-2; this gives it one directly.

Generation retrieves again after every chunk of ``chunk_len`` tokens and replaces the
neighbour part of the memory. Training shows the decoder the same thing in one pass: the
memory holds the neighbours of every chunk, and a per-position mask lets the token at
position ``t`` see the image and the neighbours of chunk ``t // chunk_len`` only
(the RETRO-style chunked cross-attention layout). So the teacher-forced logits equal the
logits of the chunked generation loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ravlm_jax.models.decoder import Decoder, KVCache, MemoryKV
from ravlm_jax.models.dual_encoder import DualEncoder
from ravlm_jax.models.layers import Embed, LayerNorm, Linear, einsum, normal, param
from ravlm_jax.models.vit import PreLNEncoderLayer
from ravlm_jax.sharding import constrain


class ProjectionTables(NamedTuple):
    """One cross-attention projection (key or value) of the neighbour memory, by parts."""

    table: jax.Array         # [V, inner] the projected token embeddings, bias included
    pos: jax.Array           # [Ln_max, inner] projected position embeddings
    slot: jax.Array          # [k_max, inner] projected slot embeddings
    next: jax.Array | None   # [V, inner] projected next-token embeddings (neighbour_next)
    end: jax.Array | None    # [inner] projected end-of-neighbour embedding (neighbour_next)


NeighbourTables = tuple[tuple[ProjectionTables, ProjectionTables], ...]  # per layer (K, V)


@dataclass(frozen=True)
class CaptionerConfig:
    image_width: int                 # width of the image tower's tokens
    k_max: int = 8                   # neighbour slots in the memory
    neighbour_len: int = 16          # tokens kept per retrieved caption
    neighbour_layers: int = 1        # transformer layers within each neighbour
    neighbour_heads: int = 4
    chunk_len: int = 4               # tokens generated between two retrievals
    use_image_tokens: bool = True
    neighbour_next: bool = False     # each retrieved token also carries the token after it
    copy_head: bool = False          # pointer-generator output over the retrieved tokens


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
        # Retrieved tokens enter the memory through the decoder's token embedding, normalised
        # (raw embeddings are ~0.02 in scale, far below the normalised image tokens, and
        # the decoder would learn to ignore them).
        self.neighbour_token_norm = LayerNorm(wd, rngs=rngs)
        # ... plus the token that follows it (a learned end vector after the last one): a
        # decoder that has just written x finds x among the retrieved tokens and reads what
        # came next in one cross-attention step, which is what copying a phrase needs.
        self.neighbour_next = (Linear(wd, wd, axes=("embed", None), use_bias=False, rngs=rngs)
                               if config.neighbour_next else None)
        self.neighbour_end = (param(rngs, normal(0.02), (wd,), ("embed",))
                              if config.neighbour_next else None)
        self.neighbour_pos = Embed(config.neighbour_len, wm, axes=(None, "embed"), rngs=rngs)
        self.neighbour_slot = Embed(config.k_max, wm, axes=(None, "embed"), rngs=rngs)
        self.neighbour_layers = nnx.List([
            PreLNEncoderLayer(wm, config.neighbour_heads, 4 * wm, "gelu", 1e-5, rngs=rngs)
            for _ in range(config.neighbour_layers)])
        self.neighbour_norm = LayerNorm(wm, rngs=rngs) if config.neighbour_layers else None
        # copy head: a query against the last block's cross-attention keys, and the gate
        self.copy_query = (Linear(wd, decoder.cfg.cross_width, axes=("embed", None), rngs=rngs)
                           if config.copy_head else None)
        self.copy_gate = (Linear(wd, 1, axes=("embed", None), rngs=rngs)
                          if config.copy_head else None)

    # ------------------------------------------------------------------ memory pieces
    def image_memory(self, image_tokens: jax.Array) -> jax.Array:
        """[B, Ti, Wi] -> [B, Ti, Wm]."""
        return self.image_adapter(self.image_norm(image_tokens))

    def _check_neighbours(self, ids: jax.Array) -> None:
        _, k, ln = ids.shape
        if k > self.config.k_max or ln > self.config.neighbour_len:
            raise ValueError(f"neighbours [{k}, {ln}] exceed k_max={self.config.k_max}, "
                             f"neighbour_len={self.config.neighbour_len}")

    def neighbour_memory(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        """Retrieved captions ids, mask [B, k, Ln] (decoder vocab) -> [B, k*Ln, Wm]."""
        self._check_neighbours(ids)
        b, k, ln = ids.shape
        x = self.neighbour_token_norm(self.decoder.wte(ids))  # [B, k, Ln, Wd]
        if self.neighbour_next is not None:
            next_ids, is_last = _next_tokens(ids, mask)
            nxt = self.neighbour_next(self.neighbour_token_norm(self.decoder.wte(next_ids)))
            x = x + jnp.where(is_last[..., None], self.neighbour_end[...], nxt)
        if self.neighbour_proj is not None:
            x = self.neighbour_proj(x)  # [B, k, Ln, Wm]
        x = (x + self.neighbour_pos.embedding[...][:ln]
             + self.neighbour_slot.embedding[...][:k, None, :])
        x = x.reshape(b * k, ln, -1)  # [B*k, Ln, Wm]: attention within each neighbour
        attn_mask = mask.reshape(b * k, ln).astype(bool)[:, None, None, :]  # [B*k, 1, 1, Ln]
        for layer in self.neighbour_layers:
            x = layer(x, attn_mask)
        if self.neighbour_norm is not None:
            x = self.neighbour_norm(x)
        return constrain(x.reshape(b, k * ln, -1), ("batch", "length", "embed"))

    def linear_neighbours(self) -> bool:
        """Whether a neighbour token's memory is linear in its embeddings (no neighbour
        layers, no projection), so its cross-attention K/V come from lookup tables."""
        return not self.neighbour_layers and self.neighbour_proj is None

    def neighbour_tables(self) -> NeighbourTables:
        """Per decoder layer, the (key, value) lookup tables of the neighbour memory.

        Without neighbour layers the memory of a neighbour token is linear in its
        embeddings, ``norm(wte)[id] + next(norm(wte)[id']) + pos[l] + slot[j]`` (``id'``
        the following token), so each layer's K (and V) is
        ``table[id] + next_table[id'] + P[l] + S[j]`` with ``table = key(norm(wte))``
        projected once over the vocabulary (bias included there, once). Generation builds
        them once per parameter set (:func:`ravlm_jax.generate.make_generator`), so a
        chunk's new neighbours cost a gather instead of 2 x layers matmuls.
        """
        if not self.linear_neighbours():
            raise ValueError("neighbour lookup tables need neighbour_layers=0 and no "
                             "neighbour projection")
        emb = self.neighbour_token_norm(self.decoder.wte.embedding[...])  # [V, W]
        pos = self.neighbour_pos.embedding[...]  # [Ln_max, W]
        slot = self.neighbour_slot.embedding[...]  # [k_max, W]
        nxt = self.neighbour_next(emb) if self.neighbour_next is not None else None  # [V, W]
        end = self.neighbour_end[...] if self.neighbour_next is not None else None  # [W]

        def tables(lin: Linear) -> ProjectionTables:
            kernel, dt = lin.kernel[...], lin.dtype  # [W, inner]
            return ProjectionTables(
                table=lin(emb),  # [V, inner]
                pos=einsum("lw,wi->li", pos, kernel, dt),  # [Ln_max, inner]
                slot=einsum("kw,wi->ki", slot, kernel, dt),  # [k_max, inner]
                next=None if nxt is None else einsum("vw,wi->vi", nxt, kernel, dt),
                end=None if end is None else einsum("w,wi->i", end, kernel, dt))

        return tuple((tables(block.cross_attn.key), tables(block.cross_attn.value))
                     for block in self.decoder.blocks)

    def neighbour_tables_mib(self) -> float:
        """The size :meth:`neighbour_tables` would take, in MiB (nothing is computed)."""
        shapes = jax.eval_shape(self.neighbour_tables)
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes)) / 2**20

    def neighbour_kv(self, ids: jax.Array, mask: jax.Array,
                     tables: NeighbourTables | None = None) -> tuple[MemoryKV, jax.Array]:
        """Cross-attention K/V of the neighbour memory: (MemoryKV over k*Ln slots, mask
        [B, k*Ln]).

        With linear neighbours the K/V are looked up in :meth:`neighbour_tables` (given,
        or built here when the vocabulary is smaller than the number of neighbour tokens in
        the batch, the usual training case); otherwise the tokens are projected directly.
        Both give the same K/V.
        """
        self._check_neighbours(ids)
        b, k, ln = ids.shape
        flat_mask = mask.reshape(b, k * ln).astype(bool)
        slot_ids = (jnp.where(flat_mask, ids.reshape(b, k * ln), -1) if self.config.copy_head
                    else None)  # [B, k*Ln]
        if tables is None:
            if not (self.linear_neighbours() and self.decoder.cfg.vocab_size < b * k * ln):
                kv = self.decoder.encode_memory(self.neighbour_memory(ids, mask))
                return MemoryKV(keys=kv.keys, values=kv.values, ids=slot_ids), flat_mask
            tables = self.neighbour_tables()
        if self.neighbour_next is not None:
            next_ids, is_last = _next_tokens(ids, mask)  # [B, k, Ln] each

        def look_up(t: ProjectionTables) -> jax.Array:
            out = t.table[ids] + t.pos[None, None, :ln] + t.slot[None, :k, None]  # [B,k,Ln,I]
            if t.next is not None:
                out = out + jnp.where(is_last[..., None], t.end, t.next[next_ids])
            return out.reshape(b, k * ln, -1)  # [B, k*Ln, inner]

        keys, values = [], []
        for block, (key_tables, value_tables) in zip(self.decoder.blocks, tables, strict=True):
            attn = block.cross_attn
            keys.append(attn.heads_major(attn._split(look_up(key_tables))))  # [B, H, kLn, D]
            values.append(attn.heads_major(attn._split(look_up(value_tables))))
        return MemoryKV(keys=tuple(keys), values=tuple(values), ids=slot_ids), flat_mask

    def image_kv(self, image_tokens: jax.Array) -> tuple[MemoryKV, jax.Array]:
        """[B, Ti, Wi] -> (MemoryKV over Ti slots, mask [B, Ti])."""
        kv = self.decoder.encode_memory(self.image_memory(image_tokens))
        return kv, jnp.ones(image_tokens.shape[:2], bool)

    def chunk_memory_kv(self, image: tuple[MemoryKV, jax.Array] | None, ids: jax.Array,
                        mask: jax.Array, tables: NeighbourTables | None = None
                        ) -> tuple[MemoryKV, jax.Array]:
        """The cross-attention memory of one generation chunk: image K/V (computed once
        per image) followed by the K/V of this chunk's k neighbours ([B, k, Ln]; k may be
        0; ``tables``: :meth:`neighbour_tables`, built once). Returns
        (MemoryKV [B, Ti + k*Ln], mask [B, Ti + k*Ln])."""
        parts = [] if image is None else [image]
        if ids.shape[1] > 0:
            parts.append(self.neighbour_kv(ids, mask, tables))
        if not parts:
            raise ValueError("empty memory: no image tokens and no neighbours")
        return concat_memory(parts)

    def chunk_memory(self, image_mem: jax.Array | None, ids: jax.Array, mask: jax.Array
                     ) -> tuple[jax.Array, jax.Array]:
        """Raw memory of one chunk: ([B, Ti + k*Ln, Wm], mask [B, Ti + k*Ln])."""
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

    # ------------------------------------------------------------------ decoding
    def decode(self, ids: jax.Array, memory_kv: MemoryKV, memory_mask: jax.Array,
               cache: KVCache | None = None, *, deterministic: bool = True,
               rngs: nnx.Rngs | None = None) -> tuple[jax.Array, jax.Array, KVCache | None]:
        """The decoder against a memory, then :meth:`output`: the one path teacher forcing
        and generation share. ids [B, T]; memory_mask [B, M] or [B, T, M]. Returns
        (scores [B, T, V], the LM head's own logits [B, T, V], new cache or None)."""
        hidden, cache = self.decoder.hidden_states(ids, memory_kv=memory_kv,
                                                   memory_mask=memory_mask, cache=cache,
                                                   deterministic=deterministic, rngs=rngs)
        logits = self.decoder.logits(hidden)  # [B, T, V]
        return self.output(logits, hidden, memory_kv, memory_mask), logits, cache

    def scores_are_logits(self) -> bool:
        """Whether :meth:`output` returns the LM head's logits unchanged (no copy head)."""
        return self.copy_query is None

    def decode_step_vocab_major(self, ids: jax.Array, memory_kv: MemoryKV,
                                memory_mask: jax.Array, cache: KVCache
                                ) -> tuple[jax.Array, KVCache]:
        """One cached decoding step of :meth:`decode` with the scores vocabulary-major:
        ids [N, 1] -> (logits [V, N], new cache). For a model whose scores are its logits
        (:meth:`scores_are_logits`); a greedy choice reduces over the vocabulary either
        way, and XLA:CPU computes the transposed head faster for a few rows
        (:meth:`Decoder.vocab_major_logits`)."""
        if not self.scores_are_logits():
            raise ValueError("vocabulary-major decoding needs scores that are the logits "
                             "(no copy head)")
        hidden, cache = self.decoder.hidden_states(ids, memory_kv=memory_kv,
                                                   memory_mask=memory_mask, cache=cache)
        return self.decoder.vocab_major_logits(hidden[:, -1]), cache  # [V, N]

    def output(self, logits: jax.Array, hidden: jax.Array, memory_kv: MemoryKV,
               memory_mask: jax.Array) -> jax.Array:
        """The next-token scores the model predicts with: ``logits`` [B, T, V] as they are,
        or with ``copy_head``, ``log p`` of the pointer-generator mixture (see the module doc).
        hidden [B, T, W] (the decoder's final states); memory_mask [B, M] or [B, T, M]."""
        if self.scores_are_logits() or memory_kv.ids is None:
            return logits
        b, t, v = logits.shape
        keys = memory_kv.keys[-1]  # [B, H, M, D]
        h, d = keys.shape[1], keys.shape[3]
        q = self.copy_query(hidden).reshape(b, t, h, d)  # [B, T, H, D]
        scores = einsum("bthd,bhmd->bhtm", q, keys, q.dtype) / d ** 0.5  # [B, H, T, M]
        mask = memory_mask if memory_mask.ndim == 3 else memory_mask[:, None, :]  # [B,T|1,M]
        visible = mask.astype(bool) & (memory_kv.ids >= 0)[:, None, :]  # [B, T|1, M]
        visible = jnp.broadcast_to(visible, (b, t, visible.shape[-1]))  # [B, T, M]
        scores = jnp.where(visible[:, None], scores.astype(jnp.float32), -1e30)
        attn = jax.nn.softmax(scores, axis=-1).mean(axis=1)  # [B, T, M]
        p_copy = jax.vmap(_scatter_to_vocab, (0, 0, None))(attn, memory_kv.ids, v)  # [B,T,V]
        any_visible = jnp.any(visible, axis=-1)  # [B, T]
        gate = jax.nn.sigmoid(self.copy_gate(hidden)[..., 0].astype(jnp.float32))  # [B, T]
        gate = jnp.where(any_visible, gate, 1.0)[..., None]
        p = gate * jax.nn.softmax(logits, axis=-1) + (1.0 - gate) * p_copy
        return jnp.log(jnp.maximum(p, 1e-30))

    # ------------------------------------------------------------------ teacher forcing
    def __call__(self, ids: jax.Array, image_tokens: jax.Array | None,
                 neighbour_ids: jax.Array, neighbour_mask: jax.Array, *,
                 image_keep: jax.Array | None = None, deterministic: bool = True,
                 rngs: nnx.Rngs | None = None, with_lm_logits: bool = False
                 ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Teacher-forced logits.

        ids [B, T] decoder input (BOS first); image_tokens [B, Ti, Wi] or None;
        neighbour_ids / neighbour_mask [B, C, k, Ln]: the neighbours retrieved for each of
        C chunks (chunk c covers input positions [c*chunk_len, (c+1)*chunk_len)).
        image_keep [B] bool: rows whose image tokens are hidden from the decoder (training's
        image dropout, which makes it learn to read the neighbours). Returns [B, T, V]
        (with ``with_lm_logits``, also the LM head's own logits, before any copying).
        """
        b, t = ids.shape
        _, c, k, ln = neighbour_ids.shape
        cl = self.config.chunk_len
        if c * cl < t:
            raise ValueError(f"{c} chunks of {cl} tokens do not cover {t} positions")
        parts, masks = [], []
        if self.config.use_image_tokens and image_tokens is not None:
            kv, m = self.image_kv(image_tokens)
            if image_keep is not None:
                m = m & image_keep[:, None]
            parts.append((kv, m))
            masks.append(jnp.broadcast_to(m[:, None, :], (b, t, m.shape[1])))
        if k > 0:
            # each chunk's neighbours encoded on their own: [B*C, k, Ln] -> [B, C*k*Ln]
            kv, nb_valid = self.neighbour_kv(neighbour_ids.reshape(b * c, k, ln),
                                             neighbour_mask.reshape(b * c, k, ln))
            def per_row(x: jax.Array) -> jax.Array:  # [B*C, H, k*Ln, D] -> [B, H, C*k*Ln, D]
                h, d = x.shape[1], x.shape[3]
                x = x.reshape(b, c, h, k * ln, d).transpose(0, 2, 1, 3, 4)  # [B, H, C, kLn, D]
                return x.reshape(b, h, c * k * ln, d)

            kv = MemoryKV(keys=tuple(map(per_row, kv.keys)),
                          values=tuple(map(per_row, kv.values)),
                          ids=None if kv.ids is None else kv.ids.reshape(b, c * k * ln))
            nb_valid = nb_valid.reshape(b, c, k * ln)  # [B, C, k*Ln]
            own_chunk = (jnp.arange(t) // cl)[:, None] == jnp.arange(c)[None, :]  # [T, C]
            # [B, T, C, k*Ln]: position t sees only chunk(t)'s valid neighbour tokens
            m = own_chunk[None, :, :, None] & nb_valid[:, None, :, :]
            parts.append((kv, nb_valid.reshape(b, -1)))
            masks.append(m.reshape(b, t, c * k * ln))
        if not parts:
            raise ValueError("empty memory: no image tokens and no neighbours")
        memory_kv, _ = concat_memory(parts)
        memory_mask = jnp.concatenate(masks, -1)  # [B, T, M]
        out, logits, _ = self.decode(ids, memory_kv, memory_mask, deterministic=deterministic,
                                     rngs=rngs)
        return (out, logits) if with_lm_logits else out


def _scatter_to_vocab(attn: jax.Array, ids: jax.Array, vocab: int) -> jax.Array:
    """attn [T, M], slot ids [M] (-1: none) -> [T, V]: each slot's weight added to its token.
    (A scatter-add: the one-hot matmul it replaces was 100x slower at training sizes.)"""
    weights = jnp.where(ids >= 0, attn, 0.0)  # [T, M]
    return jnp.zeros((attn.shape[0], vocab), attn.dtype).at[:, jnp.maximum(ids, 0)].add(weights)


def _next_tokens(ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """ids, mask [..., Ln] -> (the id after each token [..., Ln], is-last-token [..., Ln])."""
    next_ids = jnp.concatenate([ids[..., 1:], jnp.zeros_like(ids[..., :1])], -1)
    next_valid = jnp.concatenate([mask[..., 1:], jnp.zeros_like(mask[..., :1])], -1)
    return next_ids, mask.astype(bool) & ~next_valid.astype(bool)


def concat_memory(parts: list[tuple[MemoryKV, jax.Array]]) -> tuple[MemoryKV, jax.Array]:
    """Concatenate (MemoryKV [B, H, M, D], mask [B, M]) pieces along the memory axis
    (slot ids too, -1 for the pieces that have none, when any piece has them)."""
    if len(parts) == 1:
        return parts[0]
    kvs, masks = zip(*parts, strict=True)
    keys = tuple(jnp.concatenate(layer, 2) for layer in zip(*(kv.keys for kv in kvs),
                                                             strict=True))
    values = tuple(jnp.concatenate(layer, 2) for layer in zip(*(kv.values for kv in kvs),
                                                               strict=True))
    ids = None
    if any(kv.ids is not None for kv in kvs):
        ids = jnp.concatenate([kv.ids if kv.ids is not None else
                               jnp.full(m.shape, -1, jnp.int32) for kv, m in parts], 1)
    return MemoryKV(keys=keys, values=values, ids=ids), jnp.concatenate(masks, 1)
