"""Loss functions and the jitted, sharded train step.

Every step reads its batch as example rows (``source_id``) plus, when a tower runs in the
step, pixels; captions, prefixes, neighbours and cached features are gathered in-graph from
``tables`` (device-resident, replicated). Randomness comes from
``fold_in(key(seed), step)``, so a resumed run draws exactly what an uninterrupted run
draws at the same step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ravlm_jax.models.dual_encoder import clip_loss
from ravlm_jax.train.state import TrainState

LossFn = Callable[[Any, dict, dict, jax.Array], tuple[jax.Array, dict]]


def _pick_caption(rng: jax.Array, count: jax.Array) -> jax.Array:
    """One of each row's ``count`` captions, uniformly. count [B] -> [B] int32."""
    u = jax.random.uniform(rng, count.shape)
    return jnp.minimum((u * count).astype(jnp.int32), count - 1)


# ------------------------------------------------------------------ contrastive

def contrastive_loss_fn(kind: str = "clip", prefix_weight: float = 0.5) -> LossFn:
    """In-batch contrastive loss between images and captions, plus the same loss for fused
    queries ``E(caption prefix, image)`` against the full caption: the query generation
    forms at a chunk boundary must still find the caption being written."""

    def loss_fn(model, batch, tables, rng):
        enc = model.encoder if hasattr(model, "encoder") else model
        rows = batch["source_id"]  # [B]
        r_rng, c_rng = jax.random.split(rng)
        r = _pick_caption(r_rng, tables["count"][rows])  # [B]
        if "image_pooled" in tables:
            img = tables["image_pooled"][rows]  # [B, Wi]
        else:
            img = enc.image_features(batch["pixels"])[1]
        if "text_pooled" in tables:
            txt = tables["text_pooled"][rows, r]  # [B, Wt]
        else:
            txt = enc.text_features(tables["text_ids"][rows, r], tables["text_mask"][rows, r])[1]
        u_img, u_txt = enc.embed_image_pooled(img), enc.embed_text_pooled(txt)  # [B, D]
        loss = enc.contrastive_loss(u_img, u_txt, kind)
        sim = u_img @ u_txt.T  # [B, B]
        metrics = {"contrastive_loss": loss,
                   "i2t_accuracy": jnp.mean(jnp.argmax(sim, 1) == jnp.arange(len(rows)))}
        if prefix_weight > 0:
            valid = tables["prefix_valid"][rows, r]  # [B, C]
            c = jax.random.categorical(c_rng, jnp.where(valid, 0.0, -1e9))  # [B]
            has = jnp.take_along_axis(valid, c[:, None], 1)[:, 0]  # [B]
            if "prefix_pooled" in tables:
                pre = tables["prefix_pooled"][rows, r, c]  # [B, Wt]
            else:
                pre = enc.text_features(tables["prefix_ids"][rows, r, c],
                                        tables["prefix_mask"][rows, r, c])[1]
            q = enc.fuse(u_img, enc.embed_text_pooled(pre), has)  # [B, D]
            prefix_loss = clip_loss(q, u_txt, enc.logit_scale[...])
            loss = loss + prefix_weight * prefix_loss
            metrics["prefix_loss"] = prefix_loss
        return loss, metrics

    return loss_fn


# ------------------------------------------------------------------ captioning

def sample_neighbours(rng: jax.Array, candidates: jax.Array, k_max: int, k_dropout: float,
                      neighbour_dropout: float) -> jax.Array:
    """Which datastore rows each example shows its decoder, per chunk.

    candidates [B, C, K] (top-K per chunk, leakage-filtered, -1 pads) -> [B, C, k_max]
    (-1 = empty slot). Each example draws k of its K candidates (the same ranks in every
    chunk, kept in rank order so that slot embeddings mean rank, as at inference), shows
    a random number 1..k_max of them (none with probability ``k_dropout``, so one model
    serves every k including k = 0), and drops each shown one with probability
    ``neighbour_dropout``: the decoder learns to use neighbours, not to copy one.
    """
    b, c, k = candidates.shape
    if k < k_max:  # fewer candidates than slots (top_k < k_max): the rest stay empty
        candidates = jnp.concatenate(
            [candidates, jnp.full((b, c, k_max - k), -1, candidates.dtype)], axis=2)
        k = k_max
    r_perm, r_num, r_none, r_drop = jax.random.split(rng, 4)
    order = jnp.argsort(jax.random.uniform(r_perm, (b, k)), axis=1)[:, :k_max]  # [B, k_max]
    order = jnp.sort(order, axis=1)  # rank order: slot j holds the j-th best, as at inference
    picked = jnp.take_along_axis(candidates, order[:, None, :], axis=2)  # [B, C, k_max]
    shown = jax.random.randint(r_num, (b,), 1, k_max + 1)  # [B]
    shown = jnp.where(jax.random.uniform(r_none, (b,)) < k_dropout, 0, shown)
    keep = jnp.arange(k_max)[None, :] < shown[:, None]  # [B, k_max]
    keep &= jax.random.uniform(r_drop, (b, k_max)) >= neighbour_dropout
    return jnp.where(keep[:, None, :], picked, -1)


def gather_neighbour_tokens(rows: jax.Array, token_ids: jax.Array, token_mask: jax.Array
                            ) -> tuple[jax.Array, jax.Array]:
    """datastore rows [...] (-1 = none) -> (ids, mask) [..., Ln] from the payload table."""
    safe = jnp.maximum(rows, 0)
    ids = token_ids[safe]  # [..., Ln]
    mask = token_mask[safe] * (rows >= 0)[..., None]
    return ids, mask.astype(jnp.int32)


def caption_loss_fn(k_max: int, k_dropout: float, neighbour_dropout: float,
                    label_smoothing: float = 0.0, image_dropout: float = 0.0,
                    lm_loss_weight: float = 0.0) -> LossFn:
    """Teacher-forced cross-entropy. ``image_dropout``: probability that an example's
    decoder sees only its neighbours (never when it has none), so that it learns to read
    them instead of memorising image -> caption. ``lm_loss_weight``: with a copy head, the
    weight of a second cross-entropy on the LM head alone, so that the decoder stays a
    captioner without neighbours (the mixture's loss barely trains the words the copy
    head already supplies)."""

    def loss_fn(model, batch, tables, rng):
        rows = batch["source_id"]  # [B]
        r_rng, n_rng, d_rng, i_rng = jax.random.split(rng, 4)
        r = _pick_caption(r_rng, tables["count"][rows])
        dec = tables["dec_ids"][rows, r]  # [B, Ld]
        dec_mask = tables["dec_mask"][rows, r]
        inputs, targets, weights = dec[:, :-1], dec[:, 1:], dec_mask[:, 1:]  # [B, T]
        if "image_tokens" in tables:
            image_tokens = tables["image_tokens"][rows]  # [B, Ti, Wi]
        else:
            image_tokens = model.encoder.image_tokens(batch["pixels"])
        cands = tables["neighbours"][rows, r]  # [B, C, K]
        shown = sample_neighbours(n_rng, cands, k_max, k_dropout, neighbour_dropout)
        nb_ids, nb_mask = gather_neighbour_tokens(shown, tables["payload_ids"],
                                                  tables["payload_mask"])  # [B, C, k, Ln]
        has_nb = jnp.any(shown >= 0, axis=(1, 2))  # [B]
        image_keep = ~(has_nb & (jax.random.uniform(i_rng, has_nb.shape) < image_dropout))
        logits, lm_logits = model(inputs, image_tokens.astype(jnp.float32), nb_ids, nb_mask,
                                  image_keep=image_keep, deterministic=False,
                                  rngs=nnx.Rngs(dropout=d_rng), with_lm_logits=True)  # [B,T,V]
        labels = jax.nn.one_hot(targets, logits.shape[-1])
        if label_smoothing:
            labels = optax.smooth_labels(labels, label_smoothing)
        nll = optax.softmax_cross_entropy(logits, labels)  # [B, T]
        if lm_loss_weight:
            nll = nll + lm_loss_weight * optax.softmax_cross_entropy(lm_logits, labels)
        w = weights.astype(jnp.float32)
        loss = jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)
        acc = jnp.sum((jnp.argmax(logits, -1) == targets) * w) / jnp.maximum(jnp.sum(w), 1.0)
        return loss, {"token_accuracy": acc, "neighbours_shown": jnp.mean(
            jnp.sum(shown[:, 0] >= 0, -1).astype(jnp.float32))}

    return loss_fn


# ------------------------------------------------------------------ the step

def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, graphdef: Any, seed: int,
                    state_shardings: Any, frozen_shardings: Any, table_shardings: Any,
                    batch_shardings: Any, replicated: Any) -> Callable:
    """One jitted step: (state, frozen, rest, tables, batch) -> (state, metrics). The state
    is donated; shardings are fixed, so it compiles exactly once."""

    def step(state: TrainState, frozen, rest, tables, batch):
        rng = jax.random.fold_in(jax.random.key(seed), state.step)

        def loss_of(params):
            model = nnx.merge(graphdef, params, frozen, rest)
            return loss_fn(model, batch, tables, rng)

        (loss, aux), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
                   "learning_rate": schedule(state.step), **aux}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return jax.jit(step, in_shardings=(state_shardings, frozen_shardings, replicated,
                                       table_shardings, batch_shardings),
                   out_shardings=(state_shardings, replicated), donate_argnums=(0,))


def compile_step(step: Callable, *args) -> tuple[Callable, dict]:
    """Compile before the loop; return the executable and its memory analysis (bytes)."""
    t0 = time.perf_counter()
    compiled = step.lower(*args).compile()
    info: dict[str, Any] = {"compile_seconds": round(time.perf_counter() - t0, 2)}
    try:
        mem = compiled.memory_analysis()
        for name in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                     "generated_code_size_in_bytes", "alias_size_in_bytes"):
            if hasattr(mem, name):
                info[name] = int(getattr(mem, name))
    except Exception as e:  # not every backend reports it
        info["memory_analysis"] = f"unavailable ({type(e).__name__})"
    return compiled, info
