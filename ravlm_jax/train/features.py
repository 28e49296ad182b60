"""Frozen-tower feature caches.

When a config freezes both towers (the demo: ImageNet EfficientNet-Lite0 and MiniLM), their
outputs never change during training, so computing them at every step is waste. They are
computed once per split, on the mesh, and training steps gather them by example row:
contrastive steps then train only projections and fusion, and caption steps read the image
tokens. The cache is written into the workdir (temporary file + rename), so a resumed run
reads it back instead of recomputing it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from ravlm_jax.sharding import batch_sharding


def batched_apply(fn: Callable[..., jax.Array], params, arrays: tuple[np.ndarray, ...],
                  batch_size: int, mesh: jax.sharding.Mesh, desc: str = "",
                  progress: bool = True) -> np.ndarray:
    """``fn(params, *batch)`` jitted once, applied to ``arrays`` (leading axis N) in padded
    batches sharded over the mesh's batch axes; returns the stacked numpy result [N, ...].
    ``params`` stay where they are (already placed on the mesh)."""
    n = len(arrays[0])
    step = jax.jit(fn)
    out = []
    for start in tqdm(range(0, n, batch_size), desc=desc, disable=not progress or not desc,
                      unit="batch", leave=False):
        chunk = [a[start:start + batch_size] for a in arrays]
        pad = batch_size - len(chunk[0])
        if pad:
            chunk = [np.concatenate([c, np.repeat(c[-1:], pad, 0)]) for c in chunk]
        chunk = [jax.device_put(c, batch_sharding(mesh, c.ndim)) for c in chunk]
        with jax.set_mesh(mesh):
            res = step(params, *chunk)
        out.append(np.asarray(res)[: batch_size - pad])
    return np.concatenate(out) if out else np.zeros((0,))


def image_features(model, loader, n: int, mesh, progress: bool = True
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(pooled [N, Wi] float32, tokens [N, Ti, Wi] float16) over one pass of ``loader``
    (a padded, unshuffled loader of the split; rows placed by ``source_id``)."""
    graphdef, state = nnx.split(model.encoder)

    @jax.jit
    def fn(state, pixels):
        tokens, pooled = nnx.merge(graphdef, state).image_features(pixels)
        return pooled.astype(jnp.float32), tokens.astype(jnp.float16)

    pooled = tokens = None
    seen = np.zeros(n, bool)
    for batch in tqdm(loader, desc="image features", disable=not progress, unit="batch",
                      total=getattr(loader, "steps_per_epoch", None), leave=False):
        with jax.set_mesh(mesh):
            p, t = fn(state, jax.device_put(batch["pixels"],
                                            batch_sharding(mesh, batch["pixels"].ndim)))
        p, t = np.asarray(p), np.asarray(t)
        if pooled is None:
            pooled = np.zeros((n,) + p.shape[1:], np.float32)
            tokens = np.zeros((n,) + t.shape[1:], np.float16)
        rows = batch["source_id"]
        keep = batch["valid"].astype(bool) if "valid" in batch else np.ones(len(rows), bool)
        pooled[rows[keep]], tokens[rows[keep]] = p[keep], t[keep]
        seen[rows[keep]] = True
    if pooled is None or not seen.all():
        missing = int((~seen).sum()) if pooled is not None else n
        raise RuntimeError(f"image features: {missing} of {n} rows were never produced "
                           "(unreadable images are skipped; they cannot be cached)")
    return pooled, tokens


def text_features(model, ids: np.ndarray, mask: np.ndarray, mesh, batch_size: int = 256,
                  desc: str = "text features", progress: bool = True) -> np.ndarray:
    """Pooled text-tower outputs for token rows ``ids, mask [..., L]`` -> [..., Wt]; rows
    whose mask is empty get zeros; duplicate rows are computed once."""
    lead = ids.shape[:-1]
    flat_ids, flat_mask = ids.reshape(-1, ids.shape[-1]), mask.reshape(-1, mask.shape[-1])
    live = flat_mask.sum(-1) > 0
    uniq, inverse = np.unique(np.where(flat_mask > 0, flat_ids, -1)[live], axis=0,
                              return_inverse=True)
    u_mask = (uniq >= 0).astype(np.int32)
    u_ids = np.where(uniq >= 0, uniq, 0).astype(np.int32)
    graphdef, state = nnx.split(model.encoder)

    def fn(state, i, m):
        return nnx.merge(graphdef, state).text_features(i, m)[1].astype(jnp.float32)

    width = model.encoder.config.text_width
    out = np.zeros((len(flat_ids), width), np.float32)
    if len(u_ids):
        res = batched_apply(fn, state, (u_ids, u_mask), batch_size, mesh, desc, progress)
        out[live] = res[inverse.reshape(-1)]
    return out.reshape(*lead, width)


def save_cache(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def load_cache(path: str | os.PathLike) -> dict[str, np.ndarray] | None:
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    except Exception:  # a truncated cache is recomputed, never trusted
        return None
