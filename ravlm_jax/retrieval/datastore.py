"""Datastores: encoded (key, payload) rows on disk, safe to build, resume, reuse and check.

A datastore is one directory::

    manifest.json            schema version, count, dim, dtype, normalisation, encoder
                             fingerprint, tokenizer, build config, creation time, file sizes
    embeddings.npy           [N, D] float16 | float32 unit vectors (memory-mapped on load)
    payload/token_ids.npy    [N, L] int32, right-padded with manifest["payload"]["pad_id"]
    payload/source_id.npy    [N] int64   (which example a row came from)
    payload/group_id.npy     [N] int64   (e.g. the image all captions of a row describe)
    payload/hash.npy         [N] uint64  (normalised text, else token ids: duplicate test)
    payload/text.bin + text_offsets.npy          utf-8 captions, [N + 1] int64 offsets
    payload/image_ref.bin + image_ref_offsets.npy   optional image paths / ids
    index/                   the serialized index (ScaNN assets, or a marker for exact)

The build writes everything under ``<out>.tmp-<pid>`` and renames it to ``<out>`` as its very
last step, after ``manifest.json`` (which lists every file's size) is written: a killed build
never leaves a directory that loads. Encoded rows are written in shards
(``shards/shard_00000``, renamed into place when complete), so rerunning the same build
resumes after the last complete shard. Loading checks the manifest, every file's size, the
array headers, and the encoder's fingerprint and dimension, each failure as one line.

``python -m ravlm_jax.retrieval.datastore build --encoder WORKDIR --out DIR [--split S]
[--config C]`` indexes any split with a finished run's encoder; ``info DIR`` checks one.

The leakage filter (:func:`search_filtered`) follows SmallCap and RETRO: search more than k,
drop neighbours from the query's own source or group, drop duplicate payloads, keep k.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from ravlm_jax.retrieval.index import (
    ExactIndex,
    Index,
    ScannIndex,
    check_unit_vectors,
    load_index,
    pad_results,
)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
EMBEDDINGS = "embeddings.npy"
PAYLOAD = "payload"
INDEX = "index"
SHARDS = "shards"
BUILD_STATE = "build.json"
INDEX_KINDS = ("scann", "exact")
DTYPES = ("float16", "float32")


class DatastoreError(ValueError):
    """A datastore that cannot be used as asked; the message is one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


# ----------------------------------------------------------------------------- fingerprints


def _canonical_json(config: Any) -> str:
    if config is None:
        return "null"
    if hasattr(config, "to_dict"):  # ml_collections.ConfigDict
        config = config.to_dict()
    return json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))


def _flat_arrays(state: Any) -> list[tuple[str, np.ndarray]]:
    """``(path, array)`` for every leaf of an nnx Module / State or any pytree, by path."""
    import jax
    from flax import nnx

    if isinstance(state, nnx.Module):
        state = nnx.state(state)
    leaves = jax.tree_util.tree_flatten_with_path(
        state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    out = []
    for path, leaf in leaves:
        if isinstance(leaf, nnx.Variable):
            leaf = leaf.get_value()
        out.append((jax.tree_util.keystr(path), np.asarray(leaf)))
    return sorted(out, key=lambda item: item[0])


def encoder_fingerprint(module_state: Any, config: Any = None, length: int = 16) -> str:
    """Short sha256 over the encoder's config (canonical JSON) and every parameter's path,
    dtype, shape and bytes: two encoders share a fingerprint only if they embed alike."""
    h = hashlib.sha256()
    h.update(_canonical_json(config).encode())
    for path, array in _flat_arrays(module_state):
        h.update(f"{path}|{array.dtype.str}|{array.shape}".encode())
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()[:length]


ENCODER_CONFIG_KEYS = ("image_tower", "text_tower", "embed_dim", "fusion")


def dual_encoder_fingerprint(encoder: Any, model_config: Any) -> str:
    """Fingerprint of a dual encoder and of the model-config fields that define it (not the
    decoder's: a datastore stays valid when only the captioner changes). Training and
    inference both call this, so they agree."""
    from flax import nnx

    if hasattr(model_config, "to_dict"):
        model_config = model_config.to_dict()
    return encoder_fingerprint(nnx.state(encoder, nnx.Param),
                               {k: model_config.get(k) for k in ENCODER_CONFIG_KEYS})


def _hash64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def normalise_text(text: str) -> str:
    """What counts as the same caption for de-duplication: case and spacing ignored."""
    return " ".join(text.lower().split())


def payload_hash(texts: Sequence[str] | None = None, token_ids: np.ndarray | None = None,
                 pad_id: int = 0) -> np.ndarray:
    """``[n] uint64`` per-row payload hash: normalised text when given, else token ids with
    trailing padding removed."""
    if texts is not None:
        return np.array([_hash64(normalise_text(t).encode()) for t in texts], np.uint64)
    if token_ids is None:
        raise ValueError("payload_hash needs texts or token_ids")
    rows = []
    for row in np.asarray(token_ids, np.int32):
        keep = np.flatnonzero(row != pad_id)
        rows.append(_hash64(row[:keep[-1] + 1].tobytes() if keep.size else b""))
    return np.array(rows, np.uint64)


def stable_ids(values: Any) -> np.ndarray:
    """``[n] int64`` from integer ids, or a stable 63-bit hash of string ids (only equality
    matters to the leakage filter)."""
    arr = np.asarray(values)
    if arr.dtype.kind in "iu":
        return arr.astype(np.int64).reshape(-1)
    return np.array([_hash64(str(v).encode()) >> 1 for v in arr.reshape(-1)], np.int64)


# ----------------------------------------------------------------------------- leakage filter


def _duplicates_in_rows(hashes: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """``[B, C] bool``: a valid entry whose hash already occurs at an earlier valid column
    of its row (rank order is column order, so the best-scoring copy is kept)."""
    order = np.argsort(hashes, axis=1, kind="stable")  # equal hashes stay in rank order
    h = np.take_along_axis(hashes, order, 1)
    v = np.take_along_axis(valid, order, 1).astype(np.int64)
    start = np.ones_like(v, dtype=bool)
    start[:, 1:] = h[:, 1:] != h[:, :-1]  # first column of each run of equal hashes
    seen = np.cumsum(v, axis=1)  # valid entries up to and including this column
    before_run = np.maximum.accumulate(np.where(start, seen - v, 0), axis=1)
    dup_sorted = (v == 1) & (seen - before_run > 1)
    dup = np.empty_like(dup_sorted)
    np.put_along_axis(dup, order, dup_sorted, 1)
    return dup


def _keep_first_k(scores: np.ndarray, ids: np.ndarray, keep: np.ndarray, k: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Compact the kept entries of each row to the front, in rank order, padding to k."""
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    kept = np.take_along_axis(keep, order, 1)
    out_scores = np.where(kept, np.take_along_axis(scores, order, 1), -np.inf)
    out_ids = np.where(kept, np.take_along_axis(ids, order, 1), -1)
    return pad_results(out_scores, out_ids, k)


def search_filtered(index: Index, queries: np.ndarray, k: int,
                    query_group_ids: np.ndarray | None = None,
                    query_source_ids: np.ndarray | None = None,
                    payload_group_ids: np.ndarray | None = None,
                    payload_source_ids: np.ndarray | None = None,
                    payload_text_or_token_hash: np.ndarray | None = None,
                    overfetch: int = 4, max_rounds: int = 4
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Top-k neighbours without leakage (SmallCap, RETRO), vectorised on the host.

    Fetches ``overfetch * k`` candidates, drops those whose group id or source id equals the
    query's (a caption of the query's own image, when training or evaluating on the
    datastore's own data) and those whose payload hash repeats a better-ranked candidate's,
    then keeps the best k. Rows left with fewer than k are searched again with 4x the depth
    (up to ``max_rounds`` times, or the whole datastore); what is still missing is padded
    with id -1 / score -inf. Any filter whose arrays are not given is skipped.
    """
    queries = np.asarray(queries, np.float32)
    b = queries.shape[0]

    def query_ids(values: np.ndarray | None, name: str) -> np.ndarray | None:
        if values is None:
            return None
        values = stable_ids(values)
        if values.shape != (b,):
            raise ValueError(f"{name} must have shape [{b}], got {values.shape}")
        return values

    filters = []
    for q_ids, p_ids, name in ((query_group_ids, payload_group_ids, "query_group_ids"),
                               (query_source_ids, payload_source_ids, "query_source_ids")):
        q_ids = query_ids(q_ids, name)
        if q_ids is not None and p_ids is not None:
            filters.append((q_ids, p_ids))  # memmaps stay memmaps: only hit rows are read
    hashes = payload_text_or_token_hash

    out_scores = np.full((b, k), -np.inf, np.float32)
    out_ids = np.full((b, k), -1, np.int32)
    todo = np.arange(b)
    depth = min(index.size, max(k, overfetch * k))
    for round_ in range(max_rounds + 1):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # depth may exceed a tiny datastore: padded
            scores, ids = index.search(queries[todo], depth)  # [t, depth]
        keep = ids >= 0
        safe = np.where(keep, ids, 0)
        for q_ids, p_ids in filters:
            keep &= np.asarray(p_ids[safe]) != q_ids[todo, None]
        if hashes is not None:
            keep &= ~_duplicates_in_rows(np.asarray(hashes[safe]), keep)
        s, i = _keep_first_k(scores, ids, keep, k)
        out_scores[todo], out_ids[todo] = s, i
        short = (i < 0).any(axis=1)
        if not short.any() or depth >= index.size or round_ == max_rounds:
            break
        todo, depth = todo[short], min(index.size, depth * 4)
    return out_scores, out_ids


# ----------------------------------------------------------------------------- loading


def _read_strings(blob: np.ndarray, offsets: np.ndarray, ids: np.ndarray) -> list:
    out = []
    for i in ids.reshape(-1):
        out.append("" if i < 0 else bytes(blob[offsets[i]:offsets[i + 1]]).decode("utf-8"))
    return out


def _nest(flat: list, shape: tuple[int, ...]) -> list:
    """A flat list reshaped like ``shape`` (nested lists)."""
    for dim in reversed(shape[1:]):
        flat = [flat[j:j + dim] for j in range(0, len(flat), dim)]
    return flat


def _load_npy(path: Path, shape: tuple[int, ...] | None = None,
              dtype: str | None = None) -> np.memmap:
    try:
        arr = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as e:
        raise DatastoreError(f"{path} is unreadable ({type(e).__name__}: {e})") from None
    if shape is not None and tuple(arr.shape) != tuple(shape):
        raise DatastoreError(f"{path} has shape {tuple(arr.shape)}, the manifest says "
                             f"{tuple(shape)}")
    if dtype is not None and arr.dtype != np.dtype(dtype):
        raise DatastoreError(f"{path} has dtype {arr.dtype}, the manifest says {dtype}")
    return arr


def read_manifest(directory: str | os.PathLike) -> dict:
    """The manifest, after checking the directory is a complete datastore whose files all
    have their recorded sizes."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DatastoreError(f"datastore {directory} does not exist")
    path = directory / MANIFEST
    if not path.is_file():
        raise DatastoreError(f"{directory} has no {MANIFEST}: not a datastore, or an "
                             "unfinished build")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatastoreError(f"{path} is corrupted ({type(e).__name__}: {e})") from None
    required = ("schema_version", "count", "dim", "dtype", "encoder", "files")
    if not isinstance(manifest, dict) or any(key not in manifest for key in required):
        raise DatastoreError(f"{path} is corrupted (needs fields {', '.join(required)})")
    if manifest["schema_version"] != SCHEMA_VERSION:
        raise DatastoreError(f"{path} has schema version {manifest['schema_version']}; this "
                             f"version of ravlm_jax reads version {SCHEMA_VERSION}")
    for name, size in manifest["files"].items():
        f = directory / name
        if not f.is_file():
            raise DatastoreError(f"datastore file {f} is missing")
        if f.stat().st_size != size:
            raise DatastoreError(f"datastore file {f} is truncated or changed "
                                 f"({f.stat().st_size} bytes, expected {size})")
    return manifest


class Datastore:
    """A loaded datastore: memory-mapped embeddings and payloads, and its index on demand."""

    def __init__(self, directory: Path, manifest: dict, mesh: Any = None,
                 index_kind: str | None = None, index_options: dict | None = None):
        self.directory, self.manifest, self.mesh = directory, manifest, mesh
        self.index_options = dict(index_options or {})
        n, d = manifest["count"], manifest["dim"]
        self.embeddings = _load_npy(directory / EMBEDDINGS, (n, d), manifest["dtype"])
        p = directory / PAYLOAD
        self.token_ids = _load_npy(p / "token_ids.npy")
        if self.token_ids.shape[0] != n:
            raise DatastoreError(f"{p / 'token_ids.npy'} has {self.token_ids.shape[0]} rows, "
                                 f"the manifest says {n}")
        self.source_ids = _load_npy(p / "source_id.npy", (n,), "int64")
        self.group_ids = _load_npy(p / "group_id.npy", (n,), "int64")
        self.hashes = _load_npy(p / "hash.npy", (n,), "uint64")
        self._text = (_read_blob(p / "text.bin"), _load_npy(p / "text_offsets.npy", (n + 1,)))
        self._image_ref = None
        if manifest["payload"].get("image_ref"):
            self._image_ref = (_read_blob(p / "image_ref.bin"),
                               _load_npy(p / "image_ref_offsets.npy", (n + 1,)))
        self.index_kind = index_kind or manifest.get("index", {}).get("kind", "exact")
        self._index: Index | None = None

    @classmethod
    def load(cls, directory: str | os.PathLike, expect_fingerprint: str | None = None,
             expect_dim: int | None = None, *, index_kind: str | None = None,
             mesh: Any = None, index_options: dict | None = None) -> Datastore:
        """Open a datastore, refusing one built by another encoder (``expect_fingerprint``)
        or of another dimension (``expect_dim``). ``index_kind`` overrides the manifest's
        (``exact`` always works: it is built from the embeddings, on ``mesh``);
        ``index_options`` go to the backend (``dtype="bfloat16"`` for an exact index on TPU,
        ``num_threads`` for ScaNN)."""
        directory = Path(directory)
        manifest = read_manifest(directory)
        built_by = manifest["encoder"].get("fingerprint")
        if expect_fingerprint is not None and expect_fingerprint != built_by:
            raise DatastoreError(
                f"datastore {directory} was built by encoder {built_by}, but the encoder "
                f"given has fingerprint {expect_fingerprint}: rebuild the datastore with it")
        if expect_dim is not None and expect_dim != manifest["dim"]:
            raise DatastoreError(
                f"datastore {directory} holds dim {manifest['dim']} vectors (encoder "
                f"{built_by}), but the encoder gives dim {expect_dim} (encoder "
                f"{expect_fingerprint or 'unknown'})")
        if index_kind is not None and index_kind not in ("scann", "exact"):
            raise DatastoreError(f"index_kind must be 'scann' or 'exact', got {index_kind!r}")
        return cls(directory, manifest, mesh, index_kind, index_options)

    # -- attributes

    @property
    def fingerprint(self) -> str:
        return self.manifest["encoder"].get("fingerprint")

    @property
    def size(self) -> int:
        return int(self.manifest["count"])

    def __len__(self) -> int:
        return self.size

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def index(self) -> Index:
        """The index, loaded on first use: the saved ScaNN searcher, or an exact index over
        the embeddings (placed on ``mesh``)."""
        if self._index is None:
            self._index = self._load_index(self.index_kind)
        return self._index

    def _load_index(self, kind: str) -> Index:
        if kind == "exact":
            return ExactIndex.build(self.embeddings, self.mesh, check=False,
                                    **self.index_options)
        saved = self.manifest.get("index", {}).get("kind")
        if saved != "scann":
            raise DatastoreError(f"datastore {self.directory} has no saved ScaNN index "
                                 f"(built with index_kind={saved!r}); load it with "
                                 "index_kind='exact' or rebuild it")
        try:
            return load_index(self.directory / INDEX, **self.index_options)
        except ValueError as e:
            raise DatastoreError(f"index of {self.directory}: {e}") from None

    # -- payloads and search

    def payload(self, ids: Any) -> dict[str, Any]:
        """Payload rows for ``ids`` of any shape (e.g. ``[B, k]``); -1 gives empty rows
        (pad token ids, id -1, empty strings). Strings come as nested lists like ``ids``."""
        ids = np.asarray(ids, np.int64)
        if ids.size and (ids.max() >= self.size or ids.min() < -1):
            raise ValueError(f"payload ids must be in [-1, {self.size}), got "
                             f"[{ids.min()}, {ids.max()}]")
        safe = np.where(ids < 0, 0, ids)
        pad = ids < 0
        token_ids = np.asarray(self.token_ids[safe.reshape(-1)]).reshape(
            ids.shape + self.token_ids.shape[1:])
        token_ids = np.where(pad[..., None], self.manifest["payload"]["pad_id"], token_ids)
        out = {
            "token_ids": token_ids.astype(np.int32),
            "source_id": np.where(pad, -1, np.asarray(self.source_ids[safe])),
            "group_id": np.where(pad, -1, np.asarray(self.group_ids[safe])),
            "text": _nest(_read_strings(*self._text, ids), ids.shape),
            "image_ref": None,
        }
        if self._image_ref is not None:
            out["image_ref"] = _nest(_read_strings(*self._image_ref, ids), ids.shape)
        return out

    def search(self, queries: np.ndarray, k: int, *, query_group_ids: Any = None,
               query_source_ids: Any = None, dedupe: bool = True, overfetch: int = 4
               ) -> tuple[np.ndarray, np.ndarray]:
        """Search with the leakage filter on this datastore's own payload ids and hashes."""
        return search_filtered(self.index, queries, k, query_group_ids, query_source_ids,
                               self.group_ids, self.source_ids,
                               self.hashes if dedupe else None, overfetch=overfetch)


# ----------------------------------------------------------------------------- building

PAYLOAD_KEYS = ("text", "token_ids", "source_id", "group_id", "image_ref")


@dataclass
class _Shard:
    """One shard's rows in memory, before it is written."""

    embeddings: list[np.ndarray]
    fields: dict[str, list]
    rows: int = 0
    batches: int = 0


def _new_shard() -> _Shard:
    return _Shard([], {key: [] for key in PAYLOAD_KEYS})


def _batch_rows(batch: Mapping[str, Any], embeddings: np.ndarray, row0: int, pad_id: int
                ) -> tuple[np.ndarray, dict[str, Any]]:
    """Validate one encoded batch and pull its payload fields (rows with ``valid`` False,
    e.g. padding added to fill the mesh, are dropped)."""
    emb = np.asarray(embeddings, np.float32)
    b = emb.shape[0]
    if emb.ndim != 2:
        raise DatastoreError(f"encode_fn must return [B, D], got shape {emb.shape}")
    check_unit_vectors(emb, "encoder outputs")
    keep = np.ones(b, bool) if "valid" not in batch else np.asarray(batch["valid"], bool)
    fields: dict[str, Any] = {}
    for key in PAYLOAD_KEYS:
        value = batch.get(key) if isinstance(batch, Mapping) else None
        if value is None:
            continue
        if len(value) != b:
            raise DatastoreError(f"batch field {key!r} has {len(value)} rows but the encoder "
                                 f"returned {b}")
        fields[key] = value
    idx = np.flatnonzero(keep)
    rows = np.arange(row0, row0 + len(idx))
    text = fields.get("text")
    token_ids = fields.get("token_ids")
    out = {
        "text": [_as_str(text[i]) for i in idx] if text is not None else [""] * len(idx),
        "token_ids": (np.asarray(token_ids, np.int32)[idx] if token_ids is not None
                      else np.full((len(idx), 1), pad_id, np.int32)),
        "source_id": (stable_ids(fields["source_id"])[idx] if "source_id" in fields
                      else rows.astype(np.int64)),
        "image_ref": ([_as_str(fields["image_ref"][i]) for i in idx]
                      if "image_ref" in fields else None),
    }
    out["group_id"] = (stable_ids(fields["group_id"])[idx] if "group_id" in fields
                       else out["source_id"])
    if token_ids is not None and out["token_ids"].ndim != 2:
        raise DatastoreError(f"token_ids must be [B, L], got {out['token_ids'].shape}")
    return emb[idx], out


def _as_str(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _write_strings(directory: Path, name: str, strings: Sequence[str]) -> None:
    data = [s.encode("utf-8") for s in strings]
    offsets = np.zeros(len(data) + 1, np.int64)
    offsets[1:] = np.cumsum([len(d) for d in data])
    (directory / f"{name}.bin").write_bytes(b"".join(data))
    np.save(directory / f"{name}_offsets.npy", offsets)


def _write_shard(shards_dir: Path, number: int, shard: _Shard, first_batch: int) -> None:
    """Write a shard under a temporary name and rename it into place: a shard directory
    that exists is complete."""
    final = shards_dir / f"shard_{number:05d}"
    tmp = shards_dir / f".shard_{number:05d}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    np.save(tmp / "embeddings.npy", np.concatenate(shard.embeddings))
    f = shard.fields
    width = max(t.shape[1] for t in f["token_ids"])
    np.save(tmp / "token_ids.npy", np.concatenate([_pad_cols(t, width, -1)
                                                   for t in f["token_ids"]]))
    np.save(tmp / "source_id.npy", np.concatenate(f["source_id"]))
    np.save(tmp / "group_id.npy", np.concatenate(f["group_id"]))
    _write_strings(tmp, "text", [s for part in f["text"] for s in part])
    refs = f["image_ref"]
    if any(r is not None for r in refs):
        _write_strings(tmp, "image_ref", [s for part, n in zip(refs, f["source_id"], strict=True)
                                          for s in (part if part is not None else
                                                    [""] * len(n))])
    (tmp / "done.json").write_text(json.dumps({"rows": shard.rows, "batches": shard.batches,
                                               "first_batch": first_batch}))
    os.replace(tmp, final)


def _pad_cols(a: np.ndarray, width: int, value: int) -> np.ndarray:
    if a.shape[1] == width:
        return a
    return np.concatenate([a, np.full((a.shape[0], width - a.shape[1]), value, a.dtype)], 1)


def _done_shards(shards_dir: Path) -> list[tuple[Path, dict]]:
    """Complete shards, in order; they form a prefix of the build."""
    out = []
    for path in sorted(shards_dir.glob("shard_*")):
        try:
            info = json.loads((path / "done.json").read_text())
        except (OSError, json.JSONDecodeError):
            break
        out.append((path, info))
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_state(tmp: Path) -> dict | None:
    try:
        return json.loads((tmp / BUILD_STATE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _claim_tmp_dir(out_dir: Path, state: dict) -> Path:
    """``<out>.tmp-<pid>`` for this process, adopting an unfinished build of the same
    inputs left by a dead process (that is the resume)."""
    mine = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    if mine.is_dir() and _read_state(mine) != state:  # this process, earlier, other inputs
        shutil.rmtree(mine)
    for other in sorted(out_dir.parent.glob(f"{out_dir.name}.tmp-*")):
        if other == mine:
            continue
        try:
            pid = int(other.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        previous = _read_state(other)
        if previous is None:
            continue
        if previous != state:
            log.warning("ignoring unfinished build %s: it was started with other inputs",
                        other)
            continue
        if _pid_alive(pid):
            raise DatastoreError(f"another build (pid {pid}) is writing {other}")
        os.replace(other, mine)
        log.info("resuming unfinished build from %s", other)
        return mine
    mine.mkdir(parents=True, exist_ok=True)
    (mine / BUILD_STATE).write_text(json.dumps(state, sort_keys=True))
    return mine


def _concat_into(path: Path, parts: list[Path], name: str, dtype: Any, shape: tuple,
                 pad_value: int | None = None) -> None:
    """Concatenate the shards' ``name`` arrays into one ``.npy`` without holding them all."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    row = 0
    for part in parts:
        a = np.load(part / name)
        if pad_value is not None:  # shards pad token columns with -1: the final pad id now
            a = _pad_cols(a, shape[1], -1)
            a = np.where(a < 0, pad_value, a)
        out[row:row + len(a)] = a.astype(dtype)
        row += len(a)
    out.flush()
    del out


def _concat_strings(directory: Path, parts: list[Path], name: str, count: int) -> None:
    offsets = np.zeros(count + 1, np.int64)
    row, pos = 0, 0
    with open(directory / f"{name}.bin", "wb") as blob:
        for part in parts:
            if (part / f"{name}.bin").is_file():
                data = (part / f"{name}.bin").read_bytes()
                off = np.load(part / f"{name}_offsets.npy")
            else:  # a shard without image refs: empty strings
                n = len(np.load(part / "source_id.npy", mmap_mode="r"))
                data, off = b"", np.zeros(n + 1, np.int64)
            blob.write(data)
            offsets[row + 1:row + len(off)] = pos + off[1:]
            row, pos = row + len(off) - 1, pos + len(data)
    np.save(directory / f"{name}_offsets.npy", offsets)


def _save_hashes(payload: Path, blob: np.ndarray, offsets: np.ndarray,
                 token_ids: np.ndarray, pad_id: int, block: int = 1 << 16) -> None:
    """``hash.npy``: the normalised text's hash, else the token ids', else (an empty
    payload) a per-row value, so that empty rows are never taken for duplicates."""
    count = len(offsets) - 1
    hashes = np.empty(count, np.uint64)
    for start in range(0, count, block):
        rows = np.arange(start, min(count, start + block))
        texts = _read_strings(blob, offsets, rows)
        by_text = payload_hash(texts)
        by_tokens = payload_hash(token_ids=token_ids[rows], pad_id=pad_id)
        empty_tokens = ~(np.asarray(token_ids[rows]) != pad_id).any(axis=1)
        by_row = np.array([_hash64(b"row:%d" % r) for r in rows], np.uint64)
        has_text = np.array([bool(t.strip()) for t in texts])
        hashes[rows] = np.where(has_text, by_text, np.where(empty_tokens, by_row, by_tokens))
    np.save(payload / "hash.npy", hashes)


def _read_blob(path: Path) -> np.ndarray:
    """A ``.bin`` string blob, memory-mapped (``np.memmap`` refuses empty files)."""
    if path.stat().st_size == 0:
        return np.zeros(0, np.uint8)
    return np.memmap(path, np.uint8, mode="r")


def _finalise(tmp: Path, done: list[tuple[Path, dict]], dtype: str, pad_id: int,
              index_kind: str, index_params: dict, manifest: dict, has_image_ref: bool,
              num_threads: int | None) -> None:
    parts = [path for path, _ in done]
    count = sum(info["rows"] for _, info in done)
    if count == 0:
        raise DatastoreError("the dataset produced no rows: nothing to build")
    first = np.load(parts[0] / "embeddings.npy", mmap_mode="r")
    dim = first.shape[1]
    width = max(np.load(p / "token_ids.npy", mmap_mode="r").shape[1] for p in parts)
    payload = tmp / PAYLOAD
    payload.mkdir(exist_ok=True)
    _concat_into(tmp / EMBEDDINGS, parts, "embeddings.npy", dtype, (count, dim))
    _concat_into(payload / "token_ids.npy", parts, "token_ids.npy", np.int32, (count, width),
                 pad_value=pad_id)
    _concat_into(payload / "source_id.npy", parts, "source_id.npy", np.int64, (count,))
    _concat_into(payload / "group_id.npy", parts, "group_id.npy", np.int64, (count,))
    _concat_strings(payload, parts, "text", count)
    if has_image_ref:
        _concat_strings(payload, parts, "image_ref", count)

    offsets = np.load(payload / "text_offsets.npy")
    has_text = bool(offsets[-1] > 0)
    _save_hashes(payload, _read_blob(payload / "text.bin"), offsets,
                 np.load(payload / "token_ids.npy", mmap_mode="r"), pad_id)

    embeddings = np.load(tmp / EMBEDDINGS, mmap_mode="r")
    if index_kind == "scann":
        log.info("building the ScaNN index over %d rows", count)
        index = ScannIndex.build(np.asarray(embeddings, np.float32), num_threads=num_threads,
                                 check=False, **index_params)
        index.save(tmp / INDEX)
        manifest["index"] = {"kind": "scann", "params": index.params}
    else:
        manifest["index"] = {"kind": index_kind}
    manifest.update(count=count, dim=dim)
    manifest["payload"] = {"pad_id": pad_id, "token_length": width, "text": has_text,
                           "image_ref": has_image_ref}
    manifest["files"] = {
        str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*"))
        if p.is_file() and p.relative_to(tmp).parts[0] not in (SHARDS, BUILD_STATE)}
    # Until here a crash leaves shards to resume from (finalising again is idempotent);
    # from here on the temporary directory is complete and only needs its rename.
    (tmp / (MANIFEST + ".partial")).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp / (MANIFEST + ".partial"), tmp / MANIFEST)
    shutil.rmtree(tmp / SHARDS)


def build_datastore(out_dir: str | os.PathLike, encode_fn: Callable[[Any], Any],
                    batches: Iterable[Mapping[str, Any]], *, fingerprint: str,
                    config_dict: Any = None, tokenizer_name: str | None = None,
                    dtype: str = "float16", index_kind: str = "scann",
                    index_params: dict | None = None, shard_rows: int = 1 << 16,
                    pad_id: int = 0, total_batches: int | None = None,
                    progress: bool = True, overwrite: bool = False,
                    num_threads: int | None = None) -> Path:
    """Encode ``batches`` and write a datastore at ``out_dir``.

    ``encode_fn(batch) -> [B, D]`` unit vectors (the dual encoder, jitted on the mesh: see
    :func:`sharded_encode_fn`). Each batch is a mapping that ``encode_fn`` understands and
    that carries the payload: ``text`` (list of str), ``token_ids`` ([B, L] int, padded with
    ``pad_id``), ``source_id`` and ``group_id`` ([B] int or str; default: the row number),
    optionally ``image_ref`` ([B] str) and ``valid`` ([B] bool: False rows are padding and
    dropped). Rows are written in shards of about ``shard_rows``; rerunning the same call
    after a crash skips (without encoding) the batches of complete shards. ``index_kind``
    ``scann`` saves a ScaNN index (``index_params`` override its defaults); ``exact`` saves
    none (the exact index is built from the embeddings when the datastore is loaded).
    """
    out_dir = Path(out_dir)
    if dtype not in DTYPES:
        raise DatastoreError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if index_kind not in INDEX_KINDS:
        raise DatastoreError(f"index_kind must be one of {INDEX_KINDS}, got {index_kind!r}")
    if out_dir.exists() and not overwrite:
        raise DatastoreError(f"{out_dir} already exists; pass overwrite=True to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    config_json = _canonical_json(config_dict)
    state = {"fingerprint": fingerprint, "config": config_json, "dtype": dtype,
             "shard_rows": shard_rows, "pad_id": pad_id, "index_kind": index_kind,
             "index_params": _canonical_json(index_params or {})}
    tmp = _claim_tmp_dir(out_dir, state)
    if (tmp / MANIFEST).is_file():  # a build killed after it finished writing
        return _publish(tmp, out_dir)
    shards_dir = tmp / SHARDS
    shards_dir.mkdir(exist_ok=True)
    done = _done_shards(shards_dir)
    skip = sum(info["batches"] for _, info in done)
    row0 = sum(info["rows"] for _, info in done)
    has_image_ref = any((p / "image_ref.bin").is_file() for p, _ in done)
    if done:
        log.info("resuming: %d shards (%d rows, %d batches) already written", len(done),
                 row0, skip)

    from tqdm.auto import tqdm

    total = total_batches if total_batches is not None else (
        len(batches) if hasattr(batches, "__len__") else None)
    bar = tqdm(total=total, desc=f"datastore {out_dir.name}", unit="batch",
               disable=not progress)
    shard, number, first_batch = _new_shard(), len(done), skip
    for b, batch in enumerate(batches):
        bar.update(1)
        if b < skip:
            continue  # already in a complete shard
        emb, fields = _batch_rows(batch, encode_fn(batch), row0, pad_id)
        row0 += len(emb)
        shard.embeddings.append(emb.astype(dtype))
        for key in PAYLOAD_KEYS:
            shard.fields[key].append(fields[key])
        has_image_ref |= fields["image_ref"] is not None
        shard.rows += len(emb)
        shard.batches += 1
        if shard.rows >= shard_rows:
            _write_shard(shards_dir, number, shard, first_batch)
            number, first_batch = number + 1, b + 1
            shard = _new_shard()
    if shard.batches:
        _write_shard(shards_dir, number, shard, first_batch)
    bar.close()

    manifest = {
        "schema_version": SCHEMA_VERSION,
        "dtype": dtype,
        "normalization": "l2 (unit vectors; cosine = dot product)",
        "encoder": {"fingerprint": fingerprint, "tokenizer": tokenizer_name},
        "build_config": json.loads(config_json),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    _finalise(tmp, _done_shards(shards_dir), dtype, pad_id, index_kind, index_params or {},
              manifest, has_image_ref, num_threads)
    return _publish(tmp, out_dir)


def _publish(tmp: Path, out_dir: Path) -> Path:
    """Check the finished temporary directory and rename it to its final name."""
    read_manifest(tmp)
    (tmp / BUILD_STATE).unlink(missing_ok=True)
    if out_dir.exists():  # overwrite: move the old one aside only now
        old = out_dir.with_name(f"{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out_dir)
    log.info("datastore %s: %d rows", out_dir, read_manifest(out_dir)["count"])
    return out_dir


def sharded_encode_fn(encode: Callable[..., Any], mesh: Any, keys: Sequence[str],
                      rules: Any = None) -> Callable[[Mapping[str, Any]], np.ndarray]:
    """``encode(*[batch[key] for key in keys]) -> [B, D]`` jitted with its inputs sharded by
    batch over the mesh; batches are padded to a multiple of the batch shards (the padding
    rows are computed and dropped), so the last, short batch needs no special case."""
    import jax

    from ravlm_jax.sharding import batch_sharding, logical_to_spec

    spec = logical_to_spec(("batch",), None, mesh, rules)
    axes = () if not spec or spec[0] is None else (
        (spec[0],) if isinstance(spec[0], str) else spec[0])
    multiple = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    jitted = jax.jit(encode)

    def run(batch: Mapping[str, Any]) -> np.ndarray:
        arrays = [np.asarray(batch[key]) for key in keys]
        b = arrays[0].shape[0]
        padded_b = -(-b // multiple) * multiple
        placed = []
        for a in arrays:
            if padded_b != b:
                a = np.concatenate([a, np.repeat(a[-1:], padded_b - b, axis=0)])
            placed.append(jax.device_put(a, batch_sharding(mesh, a.ndim, rules)))
        with jax.set_mesh(mesh):
            out = jitted(*placed)
        return np.asarray(jax.device_get(out))[:b]

    return run


# ----------------------------------------------------------------------------- CLI


@dataclass
class BuildSources:
    """What ``build`` needs from a config and a trained encoder."""

    encode_fn: Callable[[Any], Any]
    batches: Iterable[Mapping[str, Any]]
    fingerprint: str
    tokenizer_name: str | None = None
    total_batches: int | None = None
    pad_id: int = 0
    build_config: Any = None     # recorded in the manifest when no --config was given


def default_build_sources(config: Any, encoder: str, *, split: str = "train",
                          out: str = ".", progress: bool = True) -> BuildSources:
    """The split's captions keyed by the trained encoder of a ``train.py`` workdir
    (:func:`ravlm_jax.train.encode.build_sources_from_run`). Imported on call: the trainer
    sits above this package and is only needed by this command."""
    from ravlm_jax.train.encode import build_sources_from_run  # noqa: PLC0415

    return build_sources_from_run(config, encoder, split=split, out=out, progress=progress)


def _cmd_build(a: argparse.Namespace, sources_fn: Callable[..., BuildSources]) -> int:
    from ravlm_jax.config import apply_overrides, load_config

    config = None
    if a.config is not None:
        try:
            config = apply_overrides(load_config(a.config), a.override)
        except (FileNotFoundError, KeyError, ValueError) as e:
            raise DatastoreError(f"config {a.config}: {e}") from None
    elif a.override:
        raise DatastoreError("KEY=VALUE overrides need --config")
    out = a.out
    if out is None and config is not None and hasattr(config, "get"):
        out = config.get("retrieval", {}).get("datastore")
    if not out:
        raise DatastoreError("no output directory: pass --out or set retrieval.datastore")
    src = sources_fn(config, a.encoder, split=a.split, out=out, progress=not a.quiet)
    path = build_datastore(out, src.encode_fn, src.batches, fingerprint=src.fingerprint,
                           config_dict=config if config is not None else src.build_config,
                           tokenizer_name=src.tokenizer_name, dtype=a.dtype,
                           index_kind=a.index, total_batches=src.total_batches,
                           pad_id=src.pad_id, progress=not a.quiet, overwrite=a.overwrite,
                           shard_rows=a.shard_rows)
    m = read_manifest(path)
    print(f"built {path}: {m['count']} rows, dim {m['dim']}, {m['dtype']}, "
          f"index {m['index']['kind']}, encoder {m['encoder']['fingerprint']}")
    return 0


def _cmd_info(a: argparse.Namespace) -> int:
    store = Datastore.load(a.directory, expect_fingerprint=a.expect_fingerprint)
    m = store.manifest
    print(f"{store.directory}: {m['count']} rows, dim {m['dim']}, {m['dtype']}, "
          f"index {m['index']['kind']}, encoder {m['encoder']['fingerprint']}, "
          f"tokenizer {m['encoder'].get('tokenizer')}, created {m['created']}")
    if a.check_index:
        _ = store.index.size
        print("index loads")
    return 0


def main(argv: Sequence[str] | None = None, *,
         build_sources: Callable[[Any, str], BuildSources] | None = None) -> int:
    """``python -m ravlm_jax.retrieval.datastore {build,info} ...``; errors are one line on
    stderr and exit status 2."""
    p = argparse.ArgumentParser(prog="python -m ravlm_jax.retrieval.datastore",
                                description="Build or inspect a retrieval datastore.")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="encode a dataset with a trained dual encoder")
    b.add_argument("--encoder", required=True,
                   help="a train.py workdir (or its model/ directory): the trained encoder")
    b.add_argument("--config", default=None, help="configs/NAME.py[:ARG] whose data section "
                   "names the dataset to index (default: the run's own)")
    b.add_argument("--split", default="train", help="the split to index (default: train)")
    b.add_argument("--out", default=None, help="datastore directory "
                   "(default: the config's retrieval.datastore)")
    b.add_argument("--dtype", default="float16", choices=DTYPES)
    b.add_argument("--index", default="scann", choices=INDEX_KINDS)
    b.add_argument("--shard-rows", type=int, default=1 << 16)
    b.add_argument("--overwrite", action="store_true")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.add_argument("override", nargs="*", help="KEY=VALUE config overrides")
    i = sub.add_parser("info", help="check a datastore and print its manifest summary")
    i.add_argument("directory")
    i.add_argument("--expect-fingerprint", default=None)
    i.add_argument("--check-index", action="store_true", help="also load the index")
    a = p.parse_args(argv)
    try:
        if a.command == "build":
            return _cmd_build(a, build_sources or default_build_sources)
        return _cmd_info(a)
    except (DatastoreError, ValueError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main())
