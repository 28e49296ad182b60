"""Nearest-neighbour indexes over unit vectors: cosine similarity is a dot product.

Two backends share one small interface (:class:`Index`):

* ``scann``: ScaNN on the host (k-means tree + anisotropic hashing + exact re-ordering). The
  fast path for a laptop or a single host; parameters default from the datastore size
  (:func:`default_scann_params`) and any of them can be overridden.
* ``exact``: one jitted matmul + ``lax.top_k`` with the embedding matrix on device, sharded by
  rows over the mesh (logical axis ``datastore``): each shard's top-k, then a global merge.
  The recall reference, and the TPU path: :func:`exact_search` is a pure function, so the
  generation loop can call it inside its own jitted program (no host callback).

Both return ``(scores [B, k] float32, ids [B, k] int32)`` sorted by decreasing score. When
fewer than ``k`` rows exist the tail is padded with ``id = -1`` and ``score = -inf``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ravlm_jax.sharding import Rules, logical_to_spec

log = logging.getLogger(__name__)

INDEX_META = "index.json"
UNIT_NORM_TOLERANCE = 1e-2  # float16 storage rounds norms by ~1e-3


@runtime_checkable
class Index(Protocol):
    """What every backend provides; ``ids`` index the datastore's payload rows."""

    kind: str

    @property
    def size(self) -> int: ...

    @property
    def dim(self) -> int: ...

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...

    def save(self, directory: str | os.PathLike) -> None: ...


# ----------------------------------------------------------------------------- validation


def check_unit_vectors(x: np.ndarray, what: str = "embeddings",
                       tolerance: float = UNIT_NORM_TOLERANCE, block: int = 1 << 16) -> None:
    """Dot product is cosine only for unit vectors: refuse anything else instead of returning
    silently wrong neighbours. Runs in row blocks so a memmap is never loaded whole."""
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{what} must be a non-empty [N, D] array, got shape {x.shape}")
    lo, hi = math.inf, -math.inf
    for start in range(0, x.shape[0], block):
        rows = np.asarray(x[start:start + block], dtype=np.float32)
        norms = np.linalg.norm(rows, axis=1)
        if not np.all(np.isfinite(norms)):
            raise ValueError(f"{what} contain NaN or inf")
        lo, hi = min(lo, float(norms.min())), max(hi, float(norms.max()))
    if lo < 1 - tolerance or hi > 1 + tolerance:
        raise ValueError(f"{what} are not unit vectors (norms in [{lo:.4f}, {hi:.4f}]); "
                         "L2-normalise them first")


def _as_queries(queries: Any, dim: int) -> np.ndarray:
    q = np.asarray(queries, dtype=np.float32)
    if q.ndim != 2 or q.shape[1] != dim:
        raise ValueError(f"queries must have shape [B, {dim}], got {q.shape}")
    return np.ascontiguousarray(q)


def _empty(k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((0, k), np.float32), np.zeros((0, k), np.int32)


def _check_k(k: int, size: int, kind: str) -> int:
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if k > size:
        warnings.warn(f"{kind} index: k={k} exceeds the datastore size {size}; the last "
                      f"{k - size} results are padded with id -1 and score -inf",
                      stacklevel=3)
    return int(k)


def pad_results(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalise a backend's output to ``[B, k]``: invalid entries (NaN scores, negative ids,
    missing columns) become ``id = -1``, ``score = -inf``."""
    scores = np.asarray(scores, dtype=np.float32)
    ids = np.asarray(ids).astype(np.int64)
    bad = ~np.isfinite(scores) | (ids < 0)
    scores = np.where(bad, -np.inf, scores).astype(np.float32)
    ids = np.where(bad, -1, ids).astype(np.int32)
    b, have = scores.shape
    if have < k:
        scores = np.concatenate([scores, np.full((b, k - have), -np.inf, np.float32)], 1)
        ids = np.concatenate([ids, np.full((b, k - have), -1, np.int32)], 1)
    return scores[:, :k], ids[:, :k]


def _write_meta(directory: Path, meta: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    meta = dict(meta)
    meta["files"] = {p.name: p.stat().st_size for p in sorted(directory.iterdir())
                     if p.is_file() and p.name != INDEX_META}
    tmp = directory / (INDEX_META + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
    os.replace(tmp, directory / INDEX_META)


def read_index_meta(directory: str | os.PathLike) -> dict:
    """``index.json``, after checking every file it lists is present at its recorded size (a
    truncated ScaNN asset can crash the C++ loader instead of raising)."""
    directory = Path(directory)
    path = directory / INDEX_META
    if not path.is_file():
        raise ValueError(f"no {INDEX_META} in {directory}: not a saved index")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is corrupted ({type(e).__name__}: {e})".replace("\n", " ")
                         ) from None
    if not isinstance(meta, dict) or "kind" not in meta:
        raise ValueError(f"{path} is corrupted (no 'kind' field)")
    for name, size in meta.get("files", {}).items():
        f = directory / name
        if not f.is_file():
            raise ValueError(f"index file {f} is missing")
        if f.stat().st_size != size:
            raise ValueError(f"index file {f} is truncated or changed "
                             f"({f.stat().st_size} bytes, expected {size})")
    return meta


# ----------------------------------------------------------------------------- exact


def datastore_spec(mesh: Mesh | None, rows: int, rules: Rules | None = None) -> P:
    """Row sharding of the ``[rows, D]`` table: logical axis ``datastore`` (all mesh axes by
    default), dropping mesh axes that do not divide ``rows``."""
    if mesh is None:
        return P()
    return logical_to_spec(("datastore", None), (rows, 1), mesh, rules)


def _spec_axes(spec: P) -> tuple[str, ...]:
    if len(spec) == 0 or spec[0] is None:
        return ()
    return (spec[0],) if isinstance(spec[0], str) else tuple(spec[0])


def num_datastore_shards(mesh: Mesh | None, rules: Rules | None = None) -> int:
    """How many row shards the ``datastore`` rule asks for on this mesh."""
    if mesh is None:
        return 1
    spec = logical_to_spec(("datastore", None), None, mesh, rules)
    return math.prod(mesh.shape[a] for a in _spec_axes(spec))


def _local_top_k(queries: jax.Array, table: jax.Array, valid_count: jax.Array, k: int,
                 offset: jax.Array | int, precision: Any = None
                 ) -> tuple[jax.Array, jax.Array]:
    """Top-k of one block of rows whose first row is global row ``offset``; rows at or past
    ``valid_count`` (padding) score -inf and get id -1."""
    scores = jnp.einsum("bd,nd->bn", queries.astype(table.dtype), table,
                        precision=precision, preferred_element_type=jnp.float32)  # [B, n]
    rows = offset + jnp.arange(table.shape[0], dtype=jnp.int32)  # [n] global row ids
    valid = rows < valid_count
    scores = jnp.where(valid[None, :], scores, -jnp.inf)
    top_scores, top = jax.lax.top_k(scores, k)  # [B, k]
    ids = jnp.where(valid[top], rows[top], -1)
    return top_scores, ids.astype(jnp.int32)


def _merge_top_k(scores: jax.Array, ids: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Global top-k of candidate lists ``[B, C]``, padded to ``k`` columns when C < k."""
    width = scores.shape[1]
    top_scores, pos = jax.lax.top_k(scores, min(k, width))  # [B, min(k, C)]
    top_ids = jnp.take_along_axis(ids, pos, axis=1)
    top_ids = jnp.where(jnp.isneginf(top_scores), -1, top_ids)
    if width < k:
        b = scores.shape[0]
        top_scores = jnp.concatenate(
            [top_scores, jnp.full((b, k - width), -jnp.inf, top_scores.dtype)], axis=1)
        top_ids = jnp.concatenate([top_ids, jnp.full((b, k - width), -1, top_ids.dtype)], 1)
    return top_scores, top_ids


def exact_search(queries: jax.Array, table: jax.Array, valid_count: jax.Array | int, k: int,
                 mesh: Mesh | None = None, *, rules: Rules | None = None,
                 precision: Any = None) -> tuple[jax.Array, jax.Array]:
    """Exact top-k by dot product; traceable, so it can run inside another jitted program.

    ``queries [B, D]`` (replicated), ``table [R, D]`` (rows sharded over the ``datastore``
    mesh axes when ``mesh`` is given; R a multiple of the shard count), ``valid_count`` the
    number of real rows (the rest is padding and is never returned). Each shard computes its
    own top-k with global row ids, the shards' candidates are all-gathered, and one more
    top-k merges them: per device the work is ``B x R/S x D`` and the traffic ``S x B x k``.
    Returns ``scores [B, k] float32`` and ``ids [B, k] int32`` (-1 / -inf pads).
    """
    rows = table.shape[0]
    spec = datastore_spec(mesh, rows, rules)
    axes = _spec_axes(spec)
    if not axes:
        scores, ids = _local_top_k(queries, table, valid_count, min(k, rows), 0, precision)
        return _merge_top_k(scores, ids, k)

    def per_shard(q, shard, valid):
        local_rows = shard.shape[0]
        offset = jax.lax.axis_index(axes) * local_rows
        return _local_top_k(q, shard, valid, min(k, local_rows), offset, precision)

    valid_count = jnp.asarray(valid_count, jnp.int32)
    # Each shard's [B, k_local] candidates, concatenated along columns: [B, S * k_local].
    scores, ids = jax.shard_map(per_shard, mesh=mesh, in_specs=(P(), spec, P()),
                                out_specs=(P(None, axes), P(None, axes)))(
                                    queries, table, valid_count)
    return _merge_top_k(scores, ids, k)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class ExactIndex:
    """Brute force on device: the recall reference, and what TPU pods use.

    The table lives on the mesh, rows sharded over the ``datastore`` axes and padded to a
    multiple of the shard count. Query batches run in power-of-two blocks (few compiled
    shapes; the ``[block, rows/S]`` score matrix stays under ``score_bytes`` per device).
    """

    kind = "exact"

    def __init__(self, table: jax.Array, size: int, mesh: Mesh | None = None,
                 rules: Rules | None = None, precision: Any = None,
                 score_bytes: int = 1 << 28):
        self.table, self._size, self.mesh, self.rules = table, size, mesh, rules
        self.precision = precision
        rows_per_shard = table.shape[0] // num_datastore_shards(mesh, rules)
        self.max_block = max(1, min(1024, 1 << int(math.log2(max(1, score_bytes //
                                                                   (4 * rows_per_shard))))))
        self._valid = jnp.asarray(size, jnp.int32)
        self._compiled: dict[int, Callable] = {}

    @property
    def size(self) -> int:
        return self._size

    @property
    def dim(self) -> int:
        return int(self.table.shape[1])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.table.dtype)

    @classmethod
    def build(cls, embeddings: np.ndarray, mesh: Mesh | None = None, *,
              dtype: str | np.dtype | None = None, rules: Rules | None = None,
              precision: Any = None, score_bytes: int = 1 << 28,
              check: bool = True) -> ExactIndex:
        """``embeddings [N, D]`` unit vectors (numpy or memmap). Each device reads only its own
        rows (``make_array_from_callback``), so a memmap far larger than one host's share is
        never loaded whole. ``dtype`` is the table's on device (``bfloat16`` halves TPU
        memory; scores are accumulated in float32 either way)."""
        if check:
            check_unit_vectors(embeddings)
        n, d = embeddings.shape
        dtype = jnp.dtype(dtype or np.float32)
        shards = num_datastore_shards(mesh, rules)
        rows = max(shards, -(-n // shards) * shards)  # pad to a multiple of the shard count
        sharding = (NamedSharding(mesh, datastore_spec(mesh, rows, rules)) if mesh is not None
                    else jax.sharding.SingleDeviceSharding(jax.devices()[0]))

        def block(index: tuple[slice, ...]) -> np.ndarray:
            start, stop, _ = index[0].indices(rows)
            out = np.zeros((stop - start, d), dtype)
            real = max(0, min(stop, n) - start)
            if real:
                out[:real] = np.asarray(embeddings[start:start + real]).astype(dtype)
            return out

        table = jax.make_array_from_callback((rows, d), sharding, block)
        return cls(table, n, mesh, rules, precision, score_bytes)

    def _fn(self, k: int) -> Callable:
        if k not in self._compiled:
            search = lambda q, t, v: exact_search(q, t, v, k, self.mesh, rules=self.rules,
                                                  precision=self.precision)
            self._compiled[k] = jax.jit(search)
        return self._compiled[k]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = _as_queries(queries, self.dim)
        k = _check_k(k, self.size, self.kind)
        if not len(q):
            return _empty(k)
        fn = self._fn(k)
        scores, ids = [], []
        for start in range(0, q.shape[0], self.max_block):
            chunk = q[start:start + self.max_block]
            width = min(self.max_block, _next_pow2(chunk.shape[0]))
            padded = np.zeros((width, self.dim), np.float32)
            padded[:chunk.shape[0]] = chunk
            s, i = fn(padded, self.table, self._valid)
            scores.append(np.asarray(s)[:chunk.shape[0]])
            ids.append(np.asarray(i)[:chunk.shape[0]])
        return pad_results(np.concatenate(scores), np.concatenate(ids), k)

    def save(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        table = np.asarray(jax.device_get(self.table))[:self.size]
        np.save(directory / "embeddings.npy", table)
        _write_meta(directory, {"kind": self.kind, "size": self.size, "dim": self.dim,
                                "dtype": str(self.dtype)})

    @classmethod
    def load(cls, directory: str | os.PathLike, mesh: Mesh | None = None,
             **kwargs: Any) -> ExactIndex:
        meta = read_index_meta(directory)
        if meta["kind"] != cls.kind:
            raise ValueError(f"{directory} holds a {meta['kind']!r} index, not 'exact'")
        table = np.load(Path(directory) / "embeddings.npy", mmap_mode="r")
        return cls.build(table, mesh, check=False, **kwargs)


# ----------------------------------------------------------------------------- scann

BRUTE_FORCE_BELOW = 10_000


MIN_ROWS_SEARCHED = 1_000  # small datastores: enough leaves to score about this many rows


def tree_ah_params(n: int) -> dict[str, Any]:
    """Tree + AH parameters for ``n`` rows (see :func:`default_scann_params`)."""
    num_leaves = max(1, min(int(round(2 * math.sqrt(n))), n // 10))
    return {
        "mode": "tree_ah",
        "num_leaves": num_leaves,
        "leaves_to_search": min(num_leaves, max(8, int(round(num_leaves / 256)),
                                                -(-MIN_ROWS_SEARCHED * num_leaves // n))),
        "training_sample_size": min(n, 250_000),
        "spherical": True,
        "quantize_centroids": False,
        "dims_per_block": 2,
        "anisotropic_quantization_threshold": 0.2,
        "reorder": 100,
    }


def default_scann_params(n: int) -> dict[str, Any]:
    """ScaNN parameters from the datastore size (tuning data in docs/PERFORMANCE.md):

    * below ``BRUTE_FORCE_BELOW`` rows a tree buys nothing: exact brute force;
    * ``num_leaves = 2 sqrt(N)`` (leaves of ~sqrt(N)/2 rows), trained by *spherical* k-means
      on up to 250k rows: for unit vectors it routes by cosine to unit centroids, where plain
      k-means centroids of leaves that mix clusters have small norms and misroute (recall@10
      0.67 -> 0.96 at N=100k);
    * ``leaves_to_search = max(8, num_leaves / 256)``: 8 of 632 leaves at 100k and of 2000 at
      1M, where recall@10 was 0.958-0.986 on clustered data of high and of low intrinsic
      dimension (0.4% of the leaves beyond 4M rows, an extrapolation); below ~60k rows, at
      least enough leaves to score ``MIN_ROWS_SEARCHED`` rows: with 8 of 283 leaves, 20k
      clustered 64-d rows gave recall@10 0.950-0.989 from build to build (ScaNN's k-means
      is not deterministic), with 15 0.977-0.994 in the same search time;
    * anisotropic hashing, 2 dims per 4-bit block, threshold 0.2 (the ScaNN paper's setting
      for inner product search; 4 dims per block lost a third of the recall on
      high-dimensional clusters), centroids scored in float;
    * exact re-ordering of the best ``reorder = 100`` AH candidates (``10 k`` when k > 10).
    """
    if n < BRUTE_FORCE_BELOW:
        return {"mode": "brute_force"}
    return tree_ah_params(n)


class ScannIndex:
    """ScaNN: tree + asymmetric hashing + exact re-order, dot product on unit vectors."""

    kind = "scann"

    def __init__(self, searcher: Any, size: int, dim: int, params: dict[str, Any],
                 num_threads: int | None = None):
        self.searcher, self._size, self._dim, self.params = searcher, size, dim, params
        self.num_threads = num_threads or os.cpu_count() or 1
        self.searcher.set_num_threads(self.num_threads)

    @property
    def size(self) -> int:
        return self._size

    @property
    def dim(self) -> int:
        return self._dim

    @classmethod
    def build(cls, embeddings: np.ndarray, *, num_threads: int | None = None,
              check: bool = True, **overrides: Any) -> ScannIndex:
        """Parameters are :func:`default_scann_params` updated by ``overrides`` (unknown keys
        are an error). ``mode="brute_force"`` forces exact ScaNN scoring at any size."""
        import scann  # heavy: only for this backend

        if check:
            check_unit_vectors(embeddings)
        n, d = embeddings.shape
        mode = overrides.get("mode", default_scann_params(n)["mode"])
        if mode not in ("tree_ah", "brute_force"):
            raise ValueError(f"ScaNN mode must be 'tree_ah' or 'brute_force', got {mode!r}")
        params = tree_ah_params(n) if mode == "tree_ah" else {"mode": mode}
        unknown = set(overrides) - set(tree_ah_params(BRUTE_FORCE_BELOW))
        if unknown:
            raise ValueError(f"unknown ScaNN parameters {sorted(unknown)}; known: "
                             f"{sorted(tree_ah_params(BRUTE_FORCE_BELOW))}")
        if mode == "tree_ah":
            params.update(overrides)
            params["leaves_to_search"] = min(params["leaves_to_search"], params["num_leaves"])
        db = np.ascontiguousarray(embeddings, dtype=np.float32)
        builder = scann.scann_ops_pybind.builder(db, 10, "dot_product")
        if num_threads:
            builder.set_n_training_threads(num_threads)
        if params["mode"] == "brute_force":
            builder = builder.score_brute_force()
        else:
            builder = (builder
                       .tree(num_leaves=params["num_leaves"],
                             num_leaves_to_search=params["leaves_to_search"],
                             training_sample_size=params["training_sample_size"],
                             spherical=params["spherical"],
                             quantize_centroids=params["quantize_centroids"])
                       .score_ah(params["dims_per_block"],
                                 anisotropic_quantization_threshold=params[
                                     "anisotropic_quantization_threshold"])
                       .reorder(params["reorder"]))
        return cls(builder.build(), n, d, params, num_threads)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = _as_queries(queries, self.dim)
        k = _check_k(k, self.size, self.kind)
        if not len(q):
            return _empty(k)
        final = min(k, self.size)
        args: dict[str, Any] = {"final_num_neighbors": final}
        if self.params["mode"] == "tree_ah":
            args["pre_reorder_num_neighbors"] = min(self.size,
                                                    max(self.params["reorder"], 10 * final))
        if q.shape[0] == 1:
            ids, scores = self.searcher.search(q[0], **args)
            ids, scores = ids[None], scores[None]
        else:
            batch = max(1, min(256, -(-q.shape[0] // (4 * self.num_threads))))
            ids, scores = self.searcher.search_batched_parallel(q, batch_size=batch, **args)
        return pad_results(scores, ids, k)

    def save(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.searcher.serialize(str(directory), relative_path=True)
        _write_meta(directory, {"kind": self.kind, "size": self.size, "dim": self.dim,
                                "params": self.params})

    @classmethod
    def load(cls, directory: str | os.PathLike, *, num_threads: int | None = None,
             **unused: Any) -> ScannIndex:
        import scann

        meta = read_index_meta(directory)
        if meta["kind"] != cls.kind:
            raise ValueError(f"{directory} holds a {meta['kind']!r} index, not 'scann'")
        searcher = scann.scann_ops_pybind.load_searcher(str(directory))
        return cls(searcher, int(meta["size"]), int(meta["dim"]), meta["params"], num_threads)


# ----------------------------------------------------------------------------- factory

BACKENDS: dict[str, type] = {"scann": ScannIndex, "exact": ExactIndex}


def make_index(kind: str, embeddings: np.ndarray, mesh: Mesh | None = None,
               **overrides: Any) -> Index:
    """Build a ``scann`` or ``exact`` index over unit vectors ``[N, D]``."""
    if kind == "exact":
        return ExactIndex.build(embeddings, mesh, **overrides)
    if kind == "scann":
        return ScannIndex.build(embeddings, **overrides)
    raise ValueError(f"unknown index kind {kind!r}; choose one of {sorted(BACKENDS)}")


def load_index(directory: str | os.PathLike, mesh: Mesh | None = None, **kwargs: Any) -> Index:
    """Load whichever backend ``directory/index.json`` names."""
    meta = read_index_meta(directory)
    cls = BACKENDS.get(meta["kind"])
    if cls is None:
        raise ValueError(f"{directory}: unknown index kind {meta['kind']!r}")
    return cls.load(directory, mesh=mesh, **kwargs)
