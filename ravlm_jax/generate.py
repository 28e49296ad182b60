"""Captioning with retrieval inside one compiled loop: generate a chunk, retrieve again, go on.

``make_generator(model, retriever, gen_cfg, k=..)`` returns a :class:`Generator`: one jitted
program per (batch shape, k, strategy) that

1. encodes the images (or takes cached image features) and the optional prompt;
2. retrieves ``k`` neighbours with the query ``q = E(prompt, image)`` and prefills the
   decoder (``[BOS] + prompt``) against the memory ``[image tokens ; neighbours]``;
3. runs an outer ``lax.scan`` over chunks and an inner ``lax.scan`` over each chunk's tokens
   with a static KV cache. After every ``chunk_len`` tokens it forms the query
   ``E(text so far, image)``, retrieves again and *replaces* the cross-attention memory:
   the image's per-layer K/V are computed once, the neighbours' once per chunk, never per
   token (``Captioner.chunk_memory_kv``; with linear neighbour memory, a gather from
   per-vocabulary tables built once per parameter set); the self-attention cache carries on.

The layout is exactly the captioner's teacher forcing (``Captioner.__call__``): the decoder
input at position ``m`` (``m = 0`` is BOS, ``m >= 1`` the m-th generated token) sees the
neighbours of chunk ``m // chunk_len``, and chunk ``c`` is retrieved with the text
``w_1 .. w_{c * chunk_len}``. With a prompt, ``[BOS] + prompt`` sees chunk 0, the j-th
generated token chunk ``j // chunk_len``, and chunk ``c`` is retrieved with
``prompt + w_1 .. w_{c * chunk_len}``.

Retrieval runs in the graph in two ways (:class:`ExactRetriever`: exact top-k over a
device-resident, row-sharded embedding matrix; :class:`ScannRetriever`: ScaNN on the host
through ``jax.pure_callback``, each device searching its own batch shard). Both drop
neighbours of the query's own group (``exclude_group_ids``) and duplicate captions, with the
rules of :func:`ravlm_jax.retrieval.datastore.search_filtered`.

Decoding: greedy, sampling (temperature / top-k / top-p, explicit PRNG key) and beam search
(length-normalised scores ``sum log p / length ** length_penalty``, length counting EOS).
Finished rows are masked: they emit padding and their later neighbours are recorded as -1.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ravlm_jax.models.captioner import Captioner
from ravlm_jax.models.decoder import KVCache, MemoryKV
from ravlm_jax.retrieval.index import ExactIndex, exact_search
from ravlm_jax.sharding import Rules, batch_sharding, logical_to_spec, state_shardings

STRATEGIES = ("greedy", "sample", "beam")
TEXT_TOKENIZER_OF_TOWER = {"bert": "bert", "clip_text": "clip"}
NO_GROUP = -2  # group code of a query that excludes nothing (matches no payload row)


# ============================================================================ configuration


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    """How to decode. ``max_len`` counts generated tokens (EOS included, BOS and prompt not).

    ``tokenizer`` names the decoder vocabulary, ``text_tokenizer`` the text tower's (pass
    tokenizer objects to :func:`make_generator` for a run's own vocabulary, e.g. a
    ``SubsetTokenizer``). ``bos_id``/``eos_id``/``pad_id`` default to the decoder
    tokenizer's (BERT: [CLS], [SEP], [PAD]). ``decoder_vocab`` is the run config's
    ``model.decoder_vocab``: ``"train"`` means the decoder uses a subset saved with the run,
    which :func:`make_generator` must be given. ``neighbour_table_mib``: with linear
    neighbour memory (``neighbour_layers=0``), the per-vocabulary K/V tables
    (:meth:`Captioner.neighbour_tables`) are built once per parameter set and kept while
    they take at most this many MiB per device (``2 x layers x V x width`` floats, twice
    that with ``neighbour_next``; on a mesh each device keeps its heads' share, see
    :func:`neighbour_table_shardings`); 0: every chunk projects its neighbours' tokens
    instead.
    ``query_lengths``: at most this many static text-tower lengths in the loop (see
    :func:`_query_buckets`); each is a copy of the text tower in the compiled program, so
    fewer compile faster and pad short queries more. 1: one length (``infer.py`` on a few
    images: its generation program compiles in ~4.4 s instead of ~7.5 s for the demo).
    """

    strategy: str = "greedy"
    max_len: int = 20
    num_beams: int = 3
    length_penalty: float = 1.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    tokenizer: str = "bert"
    text_tokenizer: str = "bert"
    decoder_vocab: str = "full"
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    neighbour_table_mib: float = 512.0
    query_lengths: int = 16

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"generate strategy {self.strategy!r} is not one of {STRATEGIES}")
        if self.max_len < 1:
            raise ValueError(f"generate max_len must be >= 1, got {self.max_len}")
        if self.strategy == "beam" and self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.query_lengths < 1:
            raise ValueError(f"query_lengths must be >= 1, got {self.query_lengths}")
        if self.neighbour_table_mib < 0:
            raise ValueError(f"neighbour_table_mib must be >= 0, got "
                             f"{self.neighbour_table_mib}")
        if self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_k must be >= 0 and top_p in (0, 1], got {self.top_k}, "
                             f"{self.top_p}")

    @property
    def beams(self) -> int:
        return self.num_beams if self.strategy == "beam" else 1

    def with_ids_of(self, tokenizer: Any) -> GenerateConfig:
        """Fill the missing special ids from the decoder's tokenizer."""
        missing = {name: int(getattr(tokenizer, name)) for name in ("bos_id", "eos_id",
                                                                    "pad_id")
                   if getattr(self, name) is None}
        return dataclasses.replace(self, **missing) if missing else self

    @classmethod
    def from_config(cls, cfg: Any = None, **overrides: Any) -> GenerateConfig:
        """From a whole run config (its ``generate`` section plus the decoder's and text
        tower's tokenizers), a ``generate`` section, a mapping or a GenerateConfig."""
        if isinstance(cfg, GenerateConfig):
            return dataclasses.replace(cfg, **overrides) if overrides else cfg
        fields = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        if cfg is not None:
            if hasattr(cfg, "to_dict"):
                cfg = cfg.to_dict()
            cfg = dict(cfg)
            if "generate" in cfg and "model" in cfg:  # a whole run config
                model = cfg["model"]
                values["tokenizer"] = model.get("tokenizer", "bert")
                values["decoder_vocab"] = model.get("decoder_vocab", "full")
                caption = cfg.get("data", {}).get("texts", {}).get("caption", {})
                tower = model.get("text_tower", {}).get("kind", "bert")
                values["text_tokenizer"] = caption.get(
                    "tokenizer", TEXT_TOKENIZER_OF_TOWER.get(tower, tower))
                cfg = dict(cfg["generate"])
            values.update({key: v for key, v in cfg.items() if key in fields})
        values.update(overrides)
        return cls(**values)


# ============================================================================ retrievers


class Retrieved(NamedTuple):
    scores: jax.Array  # [N, k] float32, -inf where none
    ids: jax.Array     # [N, k] int32 datastore rows, -1 where none
    tokens: jax.Array  # [N, k, L] int32 payload token ids (decoder vocab), pad where none


def neighbour_inputs(tokens: jax.Array, ids: jax.Array, neighbour_len: int, pad_id: int
                     ) -> tuple[jax.Array, jax.Array]:
    """Payload tokens ``[N, k, L]`` -> the captioner's ``(ids, mask) [N, k, Ln]``: the first
    ``neighbour_len`` tokens, padding and missing neighbours (id -1) masked out. Training
    must feed neighbours the same way."""
    nb = tokens[..., :neighbour_len]
    mask = (nb != pad_id) & (ids >= 0)[..., None]
    return jnp.where(mask, nb, pad_id).astype(jnp.int32), mask.astype(jnp.int32)


def _fold_hash(hashes: np.ndarray) -> np.ndarray:
    """uint64 payload hashes -> int32 (x64 is off in the graph); equal hashes stay equal."""
    h = np.asarray(hashes).astype(np.uint64)
    return ((h ^ (h >> np.uint64(32))) & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.int32)


class _Payloads:
    """The payload side shared by both retrievers: token ids, group codes, hashes."""

    def __init__(self, token_table: Any, group_ids: Any, hashes: Any, pad_id: int,
                 dedupe: bool, overfetch: int):
        from ravlm_jax.retrieval.datastore import payload_hash, stable_ids  # noqa: PLC0415

        self.token_table = np.asarray(token_table, np.int32)  # [N, L]
        if self.token_table.ndim != 2:
            raise ValueError(f"token table must be [N, L], got {self.token_table.shape}")
        n = self.token_table.shape[0]
        groups = stable_ids(np.arange(n) if group_ids is None else group_ids)
        if groups.shape != (n,):
            raise ValueError(f"group ids must have shape [{n}], got {groups.shape}")
        self.groups, codes, counts = np.unique(groups, return_inverse=True, return_counts=True)
        self.group_codes = codes.astype(np.int32).reshape(-1)  # [N] dense codes
        self.max_group = int(counts.max()) if n else 0
        self.hashes = (np.asarray(hashes, np.uint64) if hashes is not None
                       else payload_hash(token_ids=self.token_table, pad_id=pad_id))
        self.pad_id, self.dedupe, self.overfetch = int(pad_id), bool(dedupe), int(overfetch)
        if self.overfetch < 1:
            raise ValueError(f"overfetch must be >= 1, got {overfetch}")

    @property
    def size(self) -> int:
        return int(self.token_table.shape[0])

    @property
    def token_len(self) -> int:
        return int(self.token_table.shape[1])

    def group_codes_of(self, group_ids: Any) -> np.ndarray:
        """Query group ids (raw, as in the data) -> the codes the search compares; ids that
        no payload row has, and negative ids (unknown group), exclude nothing."""
        from ravlm_jax.retrieval.datastore import stable_ids  # noqa: PLC0415

        raw = np.asarray(jax.device_get(group_ids))
        ids = stable_ids(raw)
        pos = np.clip(np.searchsorted(self.groups, ids), 0, max(len(self.groups) - 1, 0))
        found = (self.groups[pos] == ids) if len(self.groups) else np.zeros(ids.shape, bool)
        if raw.dtype.kind in "iu":
            found &= raw.reshape(-1) >= 0
        return np.where(found, pos, NO_GROUP).astype(np.int32)


def _filter_top_k(scores: jax.Array, ids: jax.Array, group_codes: jax.Array,
                  hashes: jax.Array | None, exclude: jax.Array, k: int
                  ) -> tuple[jax.Array, jax.Array]:
    """In-graph leakage filter over candidates ``[N, C]`` in rank order (the rules of
    ``search_filtered``): drop the query's own group, drop a caption whose hash repeats a
    better-ranked candidate's, keep the first k (pad -1 / -inf)."""
    valid = ids >= 0
    safe = jnp.maximum(ids, 0)
    keep = valid & (group_codes[safe] != exclude[:, None])  # [N, C]
    if hashes is not None:
        h = hashes[safe]  # [N, C]
        c = h.shape[1]
        earlier = jnp.arange(c)[None, :] < jnp.arange(c)[:, None]  # [C(i), C(j)]: j < i
        same = h[:, :, None] == h[:, None, :]  # [N, C(i), C(j)]
        dup = jnp.any(same & earlier[None] & keep[:, None, :], axis=-1)  # [N, C]
        keep = keep & ~dup
    order = jnp.argsort(~keep, axis=1, stable=True)[:, :k]  # kept first, in rank order
    kept = jnp.take_along_axis(keep, order, 1)
    out_scores = jnp.where(kept, jnp.take_along_axis(scores, order, 1), -jnp.inf)
    out_ids = jnp.where(kept, jnp.take_along_axis(ids, order, 1), -1)
    if out_ids.shape[1] < k:  # fewer candidates than k (tiny datastore)
        pad = k - out_ids.shape[1]
        out_scores = jnp.pad(out_scores, ((0, 0), (0, pad)), constant_values=-jnp.inf)
        out_ids = jnp.pad(out_ids, ((0, 0), (0, pad)), constant_values=-1)
    return out_scores.astype(jnp.float32), out_ids.astype(jnp.int32)


class _PayloadRetriever:
    """What both retrievers answer from their :class:`_Payloads` (token ids, groups)."""

    payloads: _Payloads
    size = property(lambda self: self.payloads.size)
    token_len = property(lambda self: self.payloads.token_len)
    pad_id = property(lambda self: self.payloads.pad_id)

    def group_codes_of(self, group_ids: Any) -> np.ndarray:
        return self.payloads.group_codes_of(group_ids)


class ExactRetriever(_PayloadRetriever):
    """Exact top-k inside the generation program: the embedding matrix lives on the mesh,
    rows sharded over the ``datastore`` axes (:func:`exact_search`); payload token ids, group
    codes and hashes are device arrays (replicated), gathered in the graph.

    ``source``: a loaded :class:`~ravlm_jax.retrieval.datastore.Datastore`, or a tuple
    ``(embeddings [N, D] unit, token_ids [N, L], group_ids [N] or None)``. The search fetches
    ``overfetch * k + largest group`` candidates, enough that excluding the query's group
    never leaves fewer than k; duplicates beyond that depth pad with -1.
    """

    kind = "exact"

    def __init__(self, source: Any, mesh: Mesh | None = None, *, dtype: Any = None,
                 pad_id: int | None = None, dedupe: bool = True, overfetch: int = 4,
                 rules: Rules | None = None, precision: Any = None):
        embeddings, tokens, groups, hashes, pad = _unpack_source(source, pad_id)
        self.payloads = _Payloads(tokens, groups, hashes, pad, dedupe, overfetch)
        self.mesh, self.rules, self.precision = mesh, rules, precision
        index = ExactIndex.build(embeddings, mesh, dtype=dtype, rules=rules,
                                 check=not _is_datastore(source))
        if index.size != self.payloads.size:
            raise ValueError(f"{index.size} embeddings but {self.payloads.size} payload rows")
        self.dim = index.dim
        replicated = (NamedSharding(mesh, P()) if mesh is not None
                      else jax.sharding.SingleDeviceSharding(jax.devices()[0]))
        put = lambda x: jax.device_put(x, replicated)
        self._arrays = {
            "table": index.table,  # [R, D] rows sharded (R padded to the shard count)
            "tokens": put(self.payloads.token_table),  # [N, L]
            "groups": put(self.payloads.group_codes),  # [N]
            "hashes": put(_fold_hash(self.payloads.hashes)),  # [N]
        }

    def device_arrays(self) -> dict[str, jax.Array]:
        return self._arrays

    def search(self, arrays: Mapping[str, jax.Array], queries: jax.Array,
               exclude: jax.Array, k: int, mesh: Mesh | None) -> Retrieved:
        """Traceable: queries ``[N, D]``, exclude ``[N]`` group codes -> :class:`Retrieved`."""
        p = self.payloads
        depth = min(p.size, (p.overfetch * k if p.dedupe else k) + p.max_group)
        depth = max(depth, min(k, p.size), 1)
        scores, ids = exact_search(queries, arrays["table"], p.size, depth, self.mesh,
                                   rules=self.rules, precision=self.precision)
        scores, ids = _filter_top_k(scores, ids, arrays["groups"],
                                    arrays["hashes"] if p.dedupe else None, exclude, k)
        tokens = jnp.take(arrays["tokens"], jnp.maximum(ids, 0), axis=0)  # [N, k, L]
        tokens = jnp.where((ids >= 0)[..., None], tokens, p.pad_id)
        return Retrieved(scores, ids, tokens)


class ScannRetriever(_PayloadRetriever):
    """ScaNN (or any host :class:`~ravlm_jax.retrieval.index.Index`) called from the graph
    through ``jax.pure_callback``. Under a mesh the callback runs inside ``shard_map``: each
    device hands the host only its own batch shard, so nothing is gathered to one device.
    The host side is :func:`~ravlm_jax.retrieval.datastore.search_filtered` (exclusion,
    de-duplication, re-fetching when short); it returns fixed-shape ids, scores and payload
    token ids."""

    kind = "scann"

    def __init__(self, index: Any, token_table: Any, group_ids: Any = None, *,
                 hashes: Any = None, pad_id: int = 0, dedupe: bool = True,
                 overfetch: int = 4):
        self.index = index
        self.payloads = _Payloads(token_table, group_ids, hashes, pad_id, dedupe, overfetch)
        if index.size != self.payloads.size:
            raise ValueError(f"index has {index.size} rows but the payload {self.payloads.size}")
        self.dim = index.dim
        self.calls = 0  # host searches so far (benchmarks read it)

    @classmethod
    def from_datastore(cls, datastore: Any, **kwargs: Any) -> ScannRetriever:
        """The datastore's own index (ScaNN when it saved one), payloads and hashes."""
        kwargs.setdefault("pad_id", int(datastore.manifest["payload"]["pad_id"]))
        return cls(datastore.index, datastore.token_ids, datastore.group_ids,
                   hashes=datastore.hashes, **kwargs)

    def device_arrays(self) -> dict[str, jax.Array]:
        return {}

    def host_search(self, queries: np.ndarray, exclude: np.ndarray, k: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """numpy queries ``[..., D]``, exclude codes ``[...]`` -> (scores, ids, tokens)."""
        from ravlm_jax.retrieval.datastore import search_filtered  # noqa: PLC0415

        p = self.payloads
        lead = queries.shape[:-1]
        q = np.asarray(queries, np.float32).reshape(-1, queries.shape[-1])
        ex = np.asarray(exclude, np.int64).reshape(-1)
        self.calls += 1
        if q.shape[0] == 0:
            scores, ids = np.zeros((0, k), np.float32), np.zeros((0, k), np.int32)
        else:
            scores, ids = search_filtered(
                self.index, q, k, query_group_ids=ex, payload_group_ids=p.group_codes,
                payload_text_or_token_hash=p.hashes if p.dedupe else None,
                overfetch=p.overfetch)
        tokens = np.where((ids >= 0)[..., None], p.token_table[np.maximum(ids, 0)], p.pad_id)
        return (scores.astype(np.float32).reshape(*lead, k),
                ids.astype(np.int32).reshape(*lead, k),
                tokens.astype(np.int32).reshape(*lead, k, p.token_len))

    def search(self, arrays: Mapping[str, jax.Array], queries: jax.Array,
               exclude: jax.Array, k: int, mesh: Mesh | None) -> Retrieved:
        n, length = queries.shape[0], self.token_len

        def call(q: jax.Array, ex: jax.Array) -> tuple[jax.Array, ...]:
            m = q.shape[0]
            shapes = (jax.ShapeDtypeStruct((m, k), jnp.float32),
                      jax.ShapeDtypeStruct((m, k), jnp.int32),
                      jax.ShapeDtypeStruct((m, k, length), jnp.int32))
            return jax.pure_callback(lambda a, b: self.host_search(a, b, k), shapes, q, ex,
                                     vmap_method="broadcast_all")

        axes = _row_axes(mesh, n)
        if not axes:
            return Retrieved(*call(queries, exclude))
        rows = P(axes)
        out = jax.shard_map(call, mesh=mesh, in_specs=(rows, rows),
                            out_specs=(rows, rows, rows))(queries, exclude)
        return Retrieved(*out)


def _is_datastore(source: Any) -> bool:
    return hasattr(source, "manifest") and hasattr(source, "embeddings")


def _unpack_source(source: Any, pad_id: int | None):
    if _is_datastore(source):
        pad = source.manifest["payload"]["pad_id"] if pad_id is None else pad_id
        return source.embeddings, source.token_ids, source.group_ids, source.hashes, pad
    if not isinstance(source, (tuple, list)) or len(source) not in (2, 3):
        raise ValueError("ExactRetriever needs a Datastore or (embeddings, token_ids, "
                         "group_ids) arrays")
    embeddings, tokens, *rest = source
    return embeddings, tokens, (rest[0] if rest else None), None, (pad_id or 0)


def _row_axes(mesh: Mesh | None, rows: int) -> tuple[str, ...]:
    """Mesh axes to split ``rows`` over (all that divide it, in mesh order): every device
    gets its own rows, none searches another's."""
    if mesh is None:
        return ()
    axes, size = [], 1
    for name in mesh.axis_names:
        n = mesh.shape[name]
        if n > 1 and rows % (size * n) == 0:
            axes.append(name)
            size *= n
    return tuple(axes)


# ============================================================================ query text


def _query_text_in_graph(text: jax.Array, length: jax.Array, query_len: int, cls_id: int,
                         sep_id: int, pad_id: int) -> tuple[jax.Array, jax.Array]:
    """Same vocabulary for decoder and text tower: ``[CLS] text [SEP]`` (truncated to
    ``query_len``, as the tokenizer truncates), padded. text ``[N, Lt]`` right-padded."""
    body = query_len - 2
    n = jnp.minimum(length, body)  # [N]
    width = min(body, text.shape[1])
    ids = jnp.full((text.shape[0], query_len), pad_id, jnp.int32)
    ids = ids.at[:, 0].set(cls_id).at[:, 1:1 + width].set(text[:, :width])
    pos = jnp.arange(query_len)[None, :]
    ids = jnp.where(pos == n[:, None] + 1, sep_id, jnp.where(pos <= n[:, None], ids, pad_id))
    return ids, (pos <= n[:, None] + 1).astype(jnp.int32)


class QueryText:
    """How generated decoder ids become the text tower's query ids.

    * ``same``: one vocabulary: ``[CLS] ids [SEP]`` in the graph;
    * ``map``: the decoder uses a subset of the text tower's vocabulary (``SubsetTokenizer``
      with ``to_base``): ids are mapped in the graph, then wrapped the same way;
    * ``host``: different tokenizers (GPT-2 decoder, BERT text tower): decoded with the
      decoder's tokenizer and re-encoded with the text tower's in a ``pure_callback``, each
      device converting its own rows.
    """

    def __init__(self, decoder: Any, text: Any, cfg: GenerateConfig):
        self.decoder, self.text = decoder, text
        name = lambda t: t if isinstance(t, str) else t.name
        if decoder is text or (name(decoder) == name(text) and not hasattr(decoder, "to_base")):
            self.mode = "same"
            self.cls_id, self.sep_id, self.pad_id = cfg.bos_id, cfg.eos_id, cfg.pad_id
            self.to_base = None
        elif hasattr(decoder, "to_base") and decoder.base.name == name(text):
            self.mode = "map"
            base = decoder.base
            self.cls_id, self.sep_id, self.pad_id = base.bos_id, base.eos_id, base.pad_id
            self.to_base = np.asarray(decoder.to_base, np.int32)  # [V_decoder]
        else:
            self.mode = "host"
            self.decoder, self.text = _tokenizer(decoder), _tokenizer(text)
            self.to_base = None

    def query_len(self, text_len: int, text_max: int) -> int:
        return min(text_max, text_len + 2 if self.mode != "host" else 2 * text_len + 2)

    def host(self, text: np.ndarray, length: np.ndarray, query_len: int
             ) -> tuple[np.ndarray, np.ndarray]:
        lead = text.shape[:-1]
        rows = np.asarray(text).reshape(-1, text.shape[-1])
        lens = np.asarray(length).reshape(-1)
        strings = [self.decoder.decode(r[:n]) if n > 0 else ""
                   for r, n in zip(rows, lens, strict=True)]
        ids, mask = self.text.encode_batch(strings, query_len)
        mask = np.where((lens > 0)[:, None], mask, 0)  # no text: an image-only query
        return (np.asarray(ids).reshape(*lead, query_len).astype(np.int32),
                np.asarray(mask).reshape(*lead, query_len).astype(np.int32))

    def __call__(self, text: jax.Array, length: jax.Array, query_len: int,
                 to_base: jax.Array | None, mesh: Mesh | None) -> tuple[jax.Array, jax.Array]:
        if self.mode == "map":
            text = jnp.take(to_base, text, axis=0)
        if self.mode != "host":
            return _query_text_in_graph(text, length, query_len, self.cls_id, self.sep_id,
                                        self.pad_id)

        def call(t: jax.Array, n: jax.Array) -> tuple[jax.Array, jax.Array]:
            shape = jax.ShapeDtypeStruct((t.shape[0], query_len), jnp.int32)
            return jax.pure_callback(lambda a, b: self.host(a, b, query_len), (shape, shape),
                                     t, n, vmap_method="broadcast_all")

        axes = _row_axes(mesh, text.shape[0])
        if not axes:
            return call(text, length)
        return jax.shard_map(call, mesh=mesh, in_specs=(P(axes), P(axes)),
                             out_specs=(P(axes), P(axes)))(text, length)


def _query_buckets(query_len: int, mode: str, boundary_text: Sequence[int] = (),
                   most: int = GenerateConfig.query_lengths, smallest: int = 8) -> list[int]:
    """Static text-tower lengths, ending with ``query_len``. ``boundary_text``: the longest
    text (prompt + generated ids) a row can hold at each chunk boundary; ``[CLS] text
    [SEP]`` at exactly those lengths when there are at most ``most`` of them (so each
    retrieval encodes what a host-side tokenizer would, no padding), else powers of two.
    Re-tokenised text (``host``) has no length bound known in the graph: one length, as
    with ``most=1``."""
    if mode == "host" or most <= 1:
        return [query_len]
    exact = sorted({min(query_len, n + 2) for n in boundary_text})
    if exact and len(exact) <= most:
        return exact if exact[-1] == query_len else exact + [query_len]
    lengths, n = [], smallest
    while n < query_len:
        lengths.append(n)
        n *= 2
    return lengths + [query_len]


def _tokenizer(tok: Any) -> Any:
    if isinstance(tok, str):
        from ravlm_jax.data.tokenizers import get_tokenizer  # noqa: PLC0415

        return get_tokenizer(tok)
    return tok


# ============================================================================ decoding


def greedy_tokens(logits: jax.Array, axis: int = -1) -> jax.Array:
    """``logits [N, V]`` -> the first index of each row's maximum ``[N]``, as ``argmax``
    (``axis=0``: the same for vocabulary-major ``[V, N]`` logits).

    Computed as a max, then a min over the positions holding it: XLA:CPU runs
    ``jnp.argmax``'s (value, index) reduction unvectorised, 4x slower ([32, 30522]: 2.47
    against 0.59 ms). Rows with NaN give the last id."""
    return _greedy_and_max(logits, axis)[0]


def _greedy_and_max(logits: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """:func:`greedy_tokens` and the maximum it found (the chosen token's logit), [N] each."""
    v = logits.shape[axis]
    top = logits.max(axis, keepdims=True)  # [N, 1] or [1, N]
    ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, axis % logits.ndim)
    first = jnp.min(jnp.where(logits == top, ids, v), axis)  # [N]
    return jnp.minimum(first, v - 1), jnp.squeeze(top, axis)


def sample_logits(logits: jax.Array, key: jax.Array, temperature: float = 1.0,
                  top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """``logits [N, V]`` -> token ids ``[N]``: temperature, then top-k, then top-p (nucleus,
    keeping the smallest set whose probability reaches ``top_p``), as Hugging Face orders
    them. ``temperature == 0`` is greedy."""
    if temperature == 0:
        return greedy_tokens(logits)
    logits = logits.astype(jnp.float32) / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [N, 1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]  # [N, V] descending
        probs = jax.nn.softmax(sorted_logits, -1)
        before = jnp.cumsum(probs, -1) - probs  # mass of strictly better tokens
        cut = jnp.where(before < top_p, sorted_logits, jnp.inf).min(-1, keepdims=True)
        logits = jnp.where(logits < cut, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


class GenerateOutput(NamedTuple):
    tokens: np.ndarray            # [B, T] int32 decoder ids, EOS then pad after the end
    lengths: np.ndarray           # [B] int32 tokens up to and including EOS
    scores: np.ndarray            # [B] float32 sum of log p (beam: length-normalised)
    neighbour_ids: np.ndarray     # [B, C, k] int32 datastore rows per chunk (-1: none)
    neighbour_scores: np.ndarray  # [B, C, k] float32


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything static about one compiled program."""

    cfg: GenerateConfig
    k: int
    chunk_len: int
    prompt_len: int
    query_len: int
    neighbour_len: int
    pixels: bool
    use_image: bool
    neighbour_tables: bool = False  # arrays["neighbour_tables"] holds the K/V tables

    @property
    def steps(self) -> int:
        return self.cfg.max_len

    @property
    def chunks(self) -> int:
        return -(-self.steps // self.chunk_len)

    @property
    def text_len(self) -> int:
        return self.prompt_len + self.steps

    @property
    def boundary_text(self) -> list[int]:
        """The longest text a row holds when chunk ``i`` >= 1 starts (its retrieval)."""
        return [self.prompt_len + i * self.chunk_len for i in range(1, self.chunks)]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _Carry:
    pending: jax.Array       # [N] next decoder input (N = batch * beams)
    cache: KVCache
    memory: MemoryKV         # cross-attention K/V of the current chunk
    memory_mask: jax.Array   # [N, M]
    text: jax.Array          # [N, Lt] prompt + generated ids (no EOS), right-padded
    text_len: jax.Array      # [N]
    tokens: jax.Array        # [N, T] generated ids (beam: the alive beam's)
    done: jax.Array          # [N] bool
    score: jax.Array         # [N] sum of log p (beam: alive log p)
    nb_ids: jax.Array        # [N, C, k]
    nb_scores: jax.Array     # [N, C, k]
    step: jax.Array          # [] tokens chosen so far
    finished: Any            # beam search: best finished hypotheses (else None)


def _gather_rows(tree: Any, rows: jax.Array) -> Any:
    return jax.tree.map(lambda x: jnp.take(x, rows, axis=0), tree)


class _Loop:
    """The traced program; one instance per trace."""

    def __init__(self, model: Captioner, retriever: Any, arrays: Any, plan: _Plan,
                 mesh: Mesh | None, query_text: QueryText):
        self.model, self.retriever, self.arrays = model, retriever, arrays
        self.plan, self.cfg, self.mesh, self.query_text = plan, plan.cfg, mesh, query_text
        # greedy decoding without a copy head reads the LM head's logits only to pick the
        # best token and its log p: vocabulary-major logits are cheaper for several rows
        self.vocab_major = plan.cfg.strategy == "greedy" and model.scores_are_logits()

    # ----------------------------------------------------------------- memory per chunk
    def retrieve(self, text: jax.Array, text_len: jax.Array, has_text: bool
                 ) -> tuple[MemoryKV, jax.Array, jax.Array, jax.Array]:
        """-> (memory K/V, memory mask [N, M], neighbour ids, scores [N, k])."""
        plan, model = self.plan, self.model
        n = text.shape[0]
        if plan.k == 0:
            nb = jnp.zeros((n, 0, 1), jnp.int32)
            memory, mask = model.chunk_memory_kv(self.image_kv, nb, nb)
            return (memory, mask, jnp.zeros((n, 0), jnp.int32),
                    jnp.zeros((n, 0), jnp.float32))
        q = self.u_img
        if has_text:
            q = self.query_vector(text, text_len)
        found = self.retriever.search(self.arrays["retriever"], q, self.exclude, plan.k,
                                      self.mesh)
        nb_ids, nb_mask = neighbour_inputs(found.tokens, found.ids, plan.neighbour_len,
                                           self.retriever.pad_id)
        # the image's K/V were computed once; only the neighbours' are new each chunk
        memory, mask = model.chunk_memory_kv(self.image_kv, nb_ids, nb_mask,
                                             self.arrays.get("neighbour_tables"))
        return memory, mask, found.ids, found.scores

    def query_vector(self, text: jax.Array, text_len: jax.Array) -> jax.Array:
        """``E(text so far, image)`` [N, D]. The text tower runs at the shortest of a few
        static lengths (each chunk boundary's longest text, see :func:`_query_buckets`)
        that holds every row's text, chosen with ``lax.switch``: early chunks do not pay
        for the padding of the last ones, and no chunk encodes more tokens than a
        tokenizer on the host would give it. While no row has text (chunk 0 without a
        prompt) it does not run."""
        model, plan = self.model, self.plan
        lengths = _query_buckets(plan.query_len, self.query_text.mode, plan.boundary_text,
                                 most=self.cfg.query_lengths)

        def fused(length: int, _: Any) -> jax.Array:
            ids, mask = self.query_text(text, text_len, length, self.arrays.get("to_base"),
                                        self.mesh)
            u_txt = model.encoder.encode_text(ids, mask)
            return model.encoder.fuse(self.u_img, u_txt, text_len > 0)

        branches = [lambda _: self.u_img] + [functools.partial(fused, n) for n in lengths]
        need = jnp.max(text_len) + 2  # [CLS] text [SEP]
        bucket = jnp.searchsorted(jnp.asarray(lengths), need)  # first length >= need
        index = jnp.where(need > 2, 1 + jnp.minimum(bucket, len(lengths) - 1), 0)
        return jax.lax.switch(index, branches, None)

    # ----------------------------------------------------------------- one token
    def step(self, c: _Carry) -> _Carry:
        """Feed the pending token against the current chunk's memory, choose the next."""
        if self.vocab_major and c.pending.shape[0] > 1:  # one row: [1, V] is faster
            logits_vn, cache = self.model.decode_step_vocab_major(
                c.pending[:, None], c.memory, c.memory_mask, c.cache)  # [V, N]
            c, tok = self.choose_greedy(dataclasses.replace(c, cache=cache), logits_vn, 0)
            return dataclasses.replace(c, pending=tok)
        logits, _, cache = self.model.decode(c.pending[:, None], c.memory, c.memory_mask,
                                             c.cache)
        c = dataclasses.replace(c, cache=cache)
        if self.cfg.strategy == "beam":
            c, tok = self.choose_beam(c, logits[:, -1])
        else:
            c, tok = self.choose_sampled(c, logits[:, -1])
        return dataclasses.replace(c, pending=tok)

    def boundary(self, c: _Carry) -> _Carry:
        """At the start of a chunk: retrieve with the text so far (the pending token
        included) and replace the memory; rows already finished record no neighbours."""
        memory, mask, ids, scores = self.retrieve(c.text, c.text_len, True)
        chunk = c.step // self.plan.chunk_len
        ids = jnp.where(c.done[:, None], -1, ids)
        scores = jnp.where(c.done[:, None], -jnp.inf, scores)
        return dataclasses.replace(
            c, memory=memory, memory_mask=mask,
            nb_ids=jax.lax.dynamic_update_index_in_dim(c.nb_ids, ids, chunk, 1),
            nb_scores=jax.lax.dynamic_update_index_in_dim(c.nb_scores, scores, chunk, 1))

    def _append(self, c: _Carry, tok: jax.Array, live: jax.Array) -> _Carry:
        """Write ``tok`` at column ``step`` of tokens, and into the text where ``live``."""
        tokens = jax.lax.dynamic_update_index_in_dim(c.tokens, tok, c.step, 1)
        write = live & (tok != self.cfg.eos_id)
        at = jnp.arange(c.text.shape[1])[None, :] == c.text_len[:, None]
        text = jnp.where(at & write[:, None], tok[:, None], c.text)
        return dataclasses.replace(c, tokens=tokens, text=text,
                                   text_len=c.text_len + write.astype(jnp.int32),
                                   step=c.step + 1)

    def choose_greedy(self, c: _Carry, logits: jax.Array, vocab_axis: int = -1
                      ) -> tuple[_Carry, jax.Array]:
        """The best token of each row and its log p, from [N, V] logits or vocabulary-major
        [V, N] ones (``vocab_axis=0``); no [N, V] log-softmax is materialised."""
        logits = logits.astype(jnp.float32)
        tok, top = _greedy_and_max(logits, vocab_axis)  # [N], [N]
        return self._record(c, tok, top - jax.nn.logsumexp(logits, vocab_axis))

    def choose_sampled(self, c: _Carry, logits: jax.Array) -> tuple[_Carry, jax.Array]:
        cfg = self.cfg
        if cfg.strategy == "greedy":
            return self.choose_greedy(c, logits)
        logits = logits.astype(jnp.float32)  # [N, V]
        key = jax.random.fold_in(self.rng, c.step)
        tok = sample_logits(logits, key, cfg.temperature, cfg.top_k, cfg.top_p)
        # log p(tok) without materialising the [N, V] log-softmax
        tok_logp = (jnp.take_along_axis(logits, tok[:, None], 1)[:, 0]
                    - jax.nn.logsumexp(logits, -1))  # [N]
        return self._record(c, tok, tok_logp)

    def _record(self, c: _Carry, tok: jax.Array, tok_logp: jax.Array
                ) -> tuple[_Carry, jax.Array]:
        """Append the chosen tokens [N] (pad where a row is done) and add their log p."""
        cfg = self.cfg
        live = ~c.done
        tok = jnp.where(live, tok, cfg.pad_id)
        c = dataclasses.replace(c, score=c.score + jnp.where(live, tok_logp, 0.0))
        c = self._append(c, tok, live)
        return dataclasses.replace(c, done=c.done | (tok == cfg.eos_id)), tok

    def choose_beam(self, c: _Carry, logits: jax.Array) -> tuple[_Carry, jax.Array]:
        """One beam step: the best 2W continuations of the W alive beams; those ending in
        EOS join the finished set (length-normalised), the best W others stay alive, and
        every per-row state (cache, memory, text, neighbours) follows its source beam."""
        cfg, w = self.cfg, self.cfg.beams
        n, v = logits.shape
        b = n // w
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1).reshape(b, w, v)
        total = (c.score.reshape(b, w, 1) + logp).reshape(b, w * v)  # [B, W*V]
        top_vals, top_idx = jax.lax.top_k(total, 2 * w)  # [B, 2W]
        src, tok = top_idx // v, (top_idx % v).astype(jnp.int32)
        is_eos = tok == cfg.eos_id
        length = (c.step + 1).astype(jnp.float32)

        # finished candidates: the source beam's history plus EOS
        rows = (jnp.arange(b)[:, None] * w + src).reshape(-1)  # [B*2W]
        cand_tokens = jax.lax.dynamic_update_index_in_dim(
            jnp.take(c.tokens, rows, axis=0), tok.reshape(-1), c.step, 1).reshape(b, 2 * w, -1)
        cand_nb = (jnp.take(c.nb_ids, rows, axis=0).reshape(b, 2 * w, *c.nb_ids.shape[1:]),
                   jnp.take(c.nb_scores, rows, axis=0).reshape(b, 2 * w,
                                                              *c.nb_scores.shape[1:]))
        cand_scores = jnp.where(is_eos, top_vals / length ** cfg.length_penalty, -jnp.inf)
        f = c.finished
        pool_scores = jnp.concatenate([f["scores"], cand_scores], 1)  # [B, 3W]
        best_scores, best = jax.lax.top_k(pool_scores, w)  # [B, W]
        pick = lambda old, new: jnp.take_along_axis(
            jnp.concatenate([old, new], 1), best.reshape(b, w, *(1,) * (old.ndim - 2)), 1)
        finished = {
            "scores": best_scores,
            "tokens": pick(f["tokens"], cand_tokens),
            "lengths": pick(f["lengths"], jnp.broadcast_to(c.step + 1, (b, 2 * w))),
            "nb_ids": pick(f["nb_ids"], cand_nb[0]),
            "nb_scores": pick(f["nb_scores"], cand_nb[1]),
        }

        # alive beams: the best W non-EOS continuations
        alive_vals, alive = jax.lax.top_k(jnp.where(is_eos, -jnp.inf, top_vals), w)  # [B, W]
        alive_src = jnp.take_along_axis(src, alive, 1)
        alive_tok = jnp.take_along_axis(tok, alive, 1).reshape(-1)  # [N]
        rows = (jnp.arange(b)[:, None] * w + alive_src).reshape(-1)  # [N]
        moved = _gather_rows((c.memory_mask, c.text, c.text_len, c.tokens, c.nb_ids,
                              c.nb_scores), rows)
        c = dataclasses.replace(
            c, cache=c.cache.select(rows), memory=c.memory.select(rows),
            memory_mask=moved[0], text=moved[1], text_len=moved[2], tokens=moved[3],
            nb_ids=moved[4], nb_scores=moved[5], score=alive_vals.reshape(-1),
            finished=finished)
        c = self._append(c, alive_tok, jnp.ones((n,), bool))
        return c, alive_tok

    # ----------------------------------------------------------------- the program
    def __call__(self, images: Any, rng: jax.Array, prompt_ids: jax.Array,
                 prompt_mask: jax.Array, exclude: jax.Array) -> dict[str, jax.Array]:
        plan, cfg, model = self.plan, self.cfg, self.model
        w = cfg.beams
        if plan.pixels:
            image_tokens, pooled = model.encoder.image_features(images)
        else:
            image_tokens, pooled = images
        b = image_tokens.shape[0]
        rep = (lambda x: jnp.repeat(x, w, axis=0)) if w > 1 else (lambda x: x)
        self.rng = rng
        self.image_kv = (jax.tree.map(rep, model.image_kv(image_tokens)) if plan.use_image
                         else None)  # (MemoryKV [N, Ti], mask [N, Ti])
        self.u_img = rep(model.encoder.embed_image_pooled(pooled)) if plan.k else None
        self.exclude = rep(exclude)
        n, p, t = b * w, plan.prompt_len, plan.steps

        # prompt, compacted to the left (right padding), then the text buffer
        order = jnp.argsort(~prompt_mask.astype(bool), axis=1, stable=True)  # [B, P]
        prompt = jnp.take_along_axis(prompt_ids, order, 1)
        plen = prompt_mask.astype(bool).sum(1).astype(jnp.int32)  # [B]
        prompt = jnp.where(jnp.arange(p)[None, :] < plen[:, None], prompt, cfg.pad_id)
        text = jnp.full((b, plan.text_len), cfg.pad_id, jnp.int32).at[:, :p].set(prompt)
        text, text_len = rep(text), rep(plen)

        # Chunk 0 is retrieved with E(prompt, image). Without a prompt the loop does it
        # (every chunk starts with its retrieval: one compiled copy); with one, it is done
        # here because the prefill ([BOS] + prompt but its last token, which the loop feeds
        # first, so that every chunk is chunk_len feeds) attends to it.
        retrieve_in_loop = p == 0 and plan.k > 0
        if retrieve_in_loop:
            shapes = jax.eval_shape(lambda: self.retrieve(text, text_len, True))
            memory, memory_mask, ids0, scores0 = jax.tree.map(
                lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        else:
            memory, memory_mask, ids0, scores0 = self.retrieve(text, text_len, p > 0)
        seq = jnp.concatenate([jnp.full((b, 1), cfg.bos_id, jnp.int32), prompt], 1)
        shift = p - plen  # [B] left padding of each row
        pos = (jnp.arange(p + 1)[None, :] - shift[:, None]) % (p + 1)
        seq = jnp.take_along_axis(seq, pos, 1)  # [B, 1 + P] right-aligned
        cache = model.decoder.init_cache(n, p + t)
        if p:
            attn = (jnp.arange(p)[None, :] >= shift[:, None]).astype(jnp.int32)  # [B, P]
            _, cache = model.decoder(rep(seq[:, :-1]), memory_kv=memory,
                                     memory_mask=memory_mask, cache=cache,
                                     attention_mask=rep(attn))

        nb_ids = jnp.full((n, plan.chunks, plan.k), -1, jnp.int32).at[:, 0].set(ids0)
        nb_scores = jnp.full((n, plan.chunks, plan.k), -jnp.inf, jnp.float32
                             ).at[:, 0].set(scores0)
        finished = None
        if cfg.strategy == "beam":
            finished = {
                "scores": jnp.full((b, w), -jnp.inf, jnp.float32),
                "tokens": jnp.full((b, w, t), cfg.pad_id, jnp.int32),
                "lengths": jnp.zeros((b, w), jnp.int32),
                "nb_ids": jnp.full((b, w, plan.chunks, plan.k), -1, jnp.int32),
                "nb_scores": jnp.full((b, w, plan.chunks, plan.k), -jnp.inf, jnp.float32),
            }
        # beam search starts from one live beam per image (the others are copies)
        score = (jnp.tile(jnp.where(jnp.arange(w) == 0, 0.0, -jnp.inf), b)
                 if cfg.strategy == "beam" else jnp.zeros((n,), jnp.float32))
        carry = _Carry(pending=rep(seq[:, -1]), cache=cache, memory=memory,
                       memory_mask=memory_mask, text=text, text_len=text_len,
                       tokens=jnp.full((n, t), cfg.pad_id, jnp.int32),
                       done=jnp.zeros((n,), bool), score=score, nb_ids=nb_ids,
                       nb_scores=nb_scores, step=jnp.zeros((), jnp.int32), finished=finished)

        carry = self.run_steps(carry, retrieve_in_loop)
        return self.outputs(carry, b)

    def run_steps(self, carry: _Carry, retrieve_first: bool) -> _Carry:
        """Outer scan over chunks, inner scan over each chunk's ``chunk_len`` tokens. Each
        chunk starts with its retrieval (``retrieve_first``), or, when chunk 0's was done
        before the prefill, every chunk but the first does (``lax.cond``). When ``max_len``
        is not a multiple of ``chunk_len`` the steps past it are skipped (``lax.cond``):
        one compiled step body either way."""
        cl, t, chunks, k = self.plan.chunk_len, self.plan.steps, self.plan.chunks, self.plan.k
        skip = lambda c: c

        def token(c: _Carry, _: Any) -> tuple[_Carry, None]:
            if t % cl:
                return jax.lax.cond(c.step < t, self.step, skip, c), None
            return self.step(c), None

        def chunk(c: _Carry, i: jax.Array) -> tuple[_Carry, None]:
            if retrieve_first:
                c = self.boundary(c)
            elif k and chunks > 1:
                c = jax.lax.cond(i > 0, self.boundary, skip, c)
            c, _ = jax.lax.scan(token, c, None, length=cl)
            return c, None

        carry, _ = jax.lax.scan(chunk, carry, jnp.arange(chunks))
        return carry

    def outputs(self, c: _Carry, b: int) -> dict[str, jax.Array]:
        cfg = self.cfg
        if cfg.strategy != "beam":
            eos_at = jnp.argmax(c.tokens == cfg.eos_id, 1)
            has_eos = jnp.any(c.tokens == cfg.eos_id, 1)
            lengths = jnp.where(has_eos, eos_at + 1, cfg.max_len).astype(jnp.int32)
            return {"tokens": c.tokens, "lengths": lengths, "scores": c.score,
                    "neighbour_ids": c.nb_ids, "neighbour_scores": c.nb_scores}
        # beam: the alive beams compete with the finished ones, length-normalised
        w, t = cfg.beams, cfg.max_len
        f = c.finished
        alive_scores = c.score.reshape(b, w) / float(t) ** cfg.length_penalty
        scores = jnp.concatenate([f["scores"], alive_scores], 1)  # [B, 2W]
        best = jnp.argmax(scores, 1)  # [B]
        take = lambda fin, alive: jnp.take_along_axis(
            jnp.concatenate([fin, alive.reshape(b, w, *alive.shape[1:])], 1),
            best.reshape(b, 1, *(1,) * (fin.ndim - 2)), 1)[:, 0]
        return {"tokens": take(f["tokens"], c.tokens),
                "lengths": take(f["lengths"], jnp.full((b * w,), t, jnp.int32)),
                "scores": jnp.max(scores, 1),
                "neighbour_ids": take(f["nb_ids"], c.nb_ids),
                "neighbour_scores": take(f["nb_scores"], c.nb_scores)}


# ============================================================================ the generator


def neighbour_table_shardings(model: Captioner, mesh: Mesh, rules: Rules | None = None
                              ) -> tuple[Any, int]:
    """Where the neighbour K/V tables live on a mesh, and in how many parts.

    Every table's last dimension (heads x head_dim) is split like the cross-attention
    memory's heads (the ``heads`` rule), so each device keeps only its heads' columns of
    the [V, inner] tables: a chunk's gather is then local and yields the head-sharded K/V
    the attention reads, with no collective. Replicated instead, GPT-2 small's tables
    (3.7 GB) would be on every chip. Returns (a pytree of NamedSharding matching
    :meth:`Captioner.neighbour_tables`, the number of parts)."""
    heads = model.decoder.blocks[0].cross_attn.num_heads
    spec = logical_to_spec(("heads",), (heads,), mesh, rules)  # P(axes) or P(None)
    axis = spec[0] if len(spec) else None
    axes = () if axis is None else (axis,) if isinstance(axis, str) else tuple(axis)
    shapes = jax.eval_shape(model.neighbour_tables)
    shardings = jax.tree.map(
        lambda x: NamedSharding(mesh, P(*(None,) * (x.ndim - 1), axis)), shapes)
    return shardings, math.prod(mesh.shape[a] for a in axes)


@functools.lru_cache(maxsize=8)
def _table_builder(graphdef: Any, out_sharding: Any) -> Any:
    """One jitted :meth:`Captioner.neighbour_tables` per model structure (and placement)."""
    return jax.jit(lambda state: nnx.merge(graphdef, state).neighbour_tables(),
                   out_shardings=out_sharding)


_COMPILED: collections.OrderedDict = collections.OrderedDict()
_COMPILED_MAX = 32
_TRACES: collections.Counter = collections.Counter()  # program key -> times traced


class Generator:
    """``gen(images, rng, prompt_ids=None, prompt_mask=None, exclude_group_ids=None)``.

    ``images``: pixels ``[B, H, W, 3]`` (the image tower runs in the program), or cached
    features ``(image_tokens [B, Ti, Wi], pooled [B, Wi])``; image tokens alone only when
    ``k == 0``. ``prompt_ids/prompt_mask [B, P]``: decoder-vocabulary ids of a prefix
    (without BOS), right-padded. ``exclude_group_ids [B]``: never return a neighbour of the
    query's own group. Returns :class:`GenerateOutput` (numpy). Parameters are read from
    the model at every call, so a generator made once follows a training model whose
    weights change in place (``nnx.update``, an optimizer step); the model's structure is
    read once, at the first call (``nnx.split`` and hashing its graph cost ~13 ms of Python
    per call, a seventh of a batch-1 caption's). The program is compiled once per input
    shapes and shared by generators with the same settings.
    """

    def __init__(self, model: Captioner, retriever: Any, cfg: GenerateConfig, k: int,
                 chunk_len: int, mesh: Mesh | None, query_text: QueryText,
                 rules: Rules | None = None):
        self.model, self.retriever, self.cfg = model, retriever, cfg
        self.k, self.chunk_len, self.mesh, self.rules = k, chunk_len, mesh, rules
        self.query_text = query_text
        self._keys: set = set()
        self._shardings = None
        self._arrays = None
        self._split: tuple[Any, Any] | None = None  # (graphdef, state of the model's Variables)
        self._programs: dict[_Plan, Any] = {}
        # the neighbour K/V tables (see GenerateConfig), built at the first call
        self._keep_tables, self._table_shardings = False, None
        if k and model.linear_neighbours():
            parts = 1
            if mesh is not None:
                self._table_shardings, parts = neighbour_table_shardings(model, mesh, rules)
            self._keep_tables = model.neighbour_tables_mib() / parts <= cfg.neighbour_table_mib
        self._tables: tuple[list, Any] | None = None  # (parameter arrays, tables built of them)

    @property
    def keeps_neighbour_tables(self) -> bool:
        """Whether chunks gather their neighbours' K/V from per-vocabulary tables kept
        across calls (linear neighbour memory, within ``neighbour_table_mib`` per device)."""
        return self._keep_tables

    @property
    def traces(self) -> int:
        """How many times this generator's programs were traced (compiled)."""
        return sum(_TRACES[key] for key in self._keys)

    # -- helpers
    def _device_arrays(self) -> dict[str, Any]:
        """Program inputs that are not per call: the retriever's tables, the id map."""
        if self._arrays is None:
            arrays: dict[str, Any] = {
                "retriever": self.retriever.device_arrays() if self.retriever else {}}
            if self.query_text.to_base is not None:
                sharding = (NamedSharding(self.mesh, P()) if self.mesh is not None else None)
                arrays["to_base"] = jax.device_put(self.query_text.to_base, sharding)
            self._arrays = arrays
        return self._arrays

    def _batch_multiple(self) -> int:
        if self.mesh is None:
            return 1
        spec = logical_to_spec(("batch",), None, self.mesh, self.rules)
        if not spec or spec[0] is None:
            return 1
        axes = (spec[0],) if isinstance(spec[0], str) else spec[0]
        return math.prod(self.mesh.shape[a] for a in axes)

    def _plan(self, prompt_len: int, pixels: bool) -> _Plan:
        model, cfg = self.model, self.cfg
        text_max = model.encoder.text_tower.config.max_len
        text_len = prompt_len + cfg.max_len
        query_len = self.query_text.query_len(text_len, text_max)
        n_pos = model.decoder.cfg.n_positions
        if prompt_len + 1 + cfg.max_len > n_pos:
            raise ValueError(f"prompt ({prompt_len}) + BOS + max_len ({cfg.max_len}) tokens "
                             f"exceed the decoder's n_positions={n_pos}")
        nb_len = min(model.config.neighbour_len,
                     self.retriever.token_len if self.retriever is not None else 1)
        return _Plan(cfg=cfg, k=self.k, chunk_len=self.chunk_len, prompt_len=prompt_len,
                     query_len=query_len, neighbour_len=nb_len, pixels=pixels,
                     use_image=model.config.use_image_tokens,
                     neighbour_tables=self._keep_tables)

    def _on_mesh(self) -> contextlib.AbstractContextManager:
        """``jax.set_mesh`` of this generator's mesh, or nothing without one."""
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def _neighbour_tables(self, graphdef: Any, state: Any) -> Any:
        """The tables of the model's current parameters (built from ``state``, split over
        the mesh's heads axis if any): rebuilt when any of the model's parameter arrays
        was replaced (``nnx.update``, an optimizer step; JAX arrays are immutable), else
        reused."""
        params = jax.tree.leaves(self._split[1])  # the model's own arrays, unplaced
        if self._tables is not None and all(
                a is b for a, b in zip(self._tables[0], params, strict=True)):
            return self._tables[1]
        with self._on_mesh():
            tables = _table_builder(graphdef, self._table_shardings)(state)
        self._tables = (params, tables)
        return tables

    def _program(self, graphdef: Any, plan: _Plan):
        query_text = self.query_text
        key = (graphdef, plan, self.retriever, self.mesh, query_text.mode,
               query_text.decoder, query_text.text)
        self._keys.add(key)
        if key in _COMPILED:
            _COMPILED.move_to_end(key)
            return _COMPILED[key]
        retriever, mesh = self.retriever, self.mesh

        def program(state, arrays, images, rng, prompt_ids, prompt_mask, exclude):
            _TRACES[key] += 1  # runs at trace time only
            model = nnx.merge(graphdef, state)
            loop = _Loop(model, retriever, arrays, plan, mesh, query_text)
            return loop(images, rng, prompt_ids, prompt_mask, exclude)

        fn = jax.jit(program)
        _COMPILED[key] = fn
        while len(_COMPILED) > _COMPILED_MAX:
            _COMPILED.popitem(last=False)
        return fn

    def _inputs(self, images: Any, prompt_ids: Any, prompt_mask: Any,
                exclude_group_ids: Any) -> tuple[Any, bool, int, Any, Any, Any]:
        if isinstance(images, (tuple, list)):
            if len(images) != 2:
                raise ValueError("image features must be (image_tokens, pooled)")
            images, pixels = (jnp.asarray(images[0]), jnp.asarray(images[1])), False
            b = images[0].shape[0]
        else:
            images = jnp.asarray(images)
            if images.ndim == 4:
                pixels, b = True, images.shape[0]
            elif images.ndim == 3:
                if self.k:
                    raise ValueError("retrieval needs the pooled image features: pass "
                                     "(image_tokens, pooled) or pixels")
                pixels, b = False, images.shape[0]
                images = (images, jnp.zeros((b, 1), images.dtype))
            else:
                raise ValueError(f"images must be pixels [B, H, W, 3] or features, got "
                                 f"shape {tuple(images.shape)}")
        if prompt_ids is None:
            prompt_ids = np.zeros((b, 0), np.int32)
        prompt_ids = np.asarray(jax.device_get(prompt_ids), np.int32)
        if prompt_ids.ndim != 2 or prompt_ids.shape[0] != b:
            raise ValueError(f"prompt_ids must be [{b}, P], got {prompt_ids.shape}")
        prompt_mask = (np.ones_like(prompt_ids) if prompt_mask is None
                       else np.asarray(jax.device_get(prompt_mask), np.int32))
        if prompt_mask.shape != prompt_ids.shape:
            raise ValueError(f"prompt_mask {prompt_mask.shape} does not match prompt_ids "
                             f"{prompt_ids.shape}")
        if exclude_group_ids is None or self.retriever is None:
            exclude = np.full((b,), NO_GROUP, np.int32)
        else:
            exclude = self.retriever.group_codes_of(exclude_group_ids)
            if exclude.shape != (b,):
                raise ValueError(f"exclude_group_ids must have shape [{b}], got "
                                 f"{exclude.shape}")
        return images, pixels, b, prompt_ids, prompt_mask, exclude

    def __call__(self, images: Any, rng: jax.Array | None = None, prompt_ids: Any = None,
                 prompt_mask: Any = None, exclude_group_ids: Any = None) -> GenerateOutput:
        if rng is None:
            if self.cfg.strategy == "sample":
                raise ValueError("sampling needs an explicit PRNG key: gen(images, rng)")
            rng = jax.random.key(0)
        images, pixels, b, prompt_ids, prompt_mask, exclude = self._inputs(
            images, prompt_ids, prompt_mask, exclude_group_ids)
        plan = self._plan(prompt_ids.shape[1], pixels)
        if self._split is None:  # the state holds the model's own Variables, not copies
            self._split = nnx.split(self.model)
        graphdef, state = self._split
        fn = self._programs.get(plan)
        if fn is None:
            fn = self._programs[plan] = self._program(graphdef, plan)
        arrays = self._device_arrays()

        # pad the batch to a multiple of the batch shards (padding rows are dropped)
        multiple = self._batch_multiple()
        padded = -(-b // multiple) * multiple
        pad = lambda x: (x if padded == b else
                         jnp.concatenate([x, jnp.repeat(x[-1:], padded - b, 0)], 0))
        batch = jax.tree.map(pad, (images, jnp.asarray(prompt_ids), jnp.asarray(prompt_mask),
                                   jnp.asarray(exclude)))
        if self.mesh is not None:
            if self._shardings is None:
                self._shardings = state_shardings(state, self.mesh, self.rules)
            state = jax.device_put(state, self._shardings)
            batch = jax.tree.map(lambda x: jax.device_put(
                x, batch_sharding(self.mesh, x.ndim, self.rules)), batch)
        if plan.neighbour_tables:
            arrays = {**arrays,
                      "neighbour_tables": self._neighbour_tables(graphdef, state)}
        with self._on_mesh():
            out = fn(state, arrays, batch[0], rng, *batch[1:])
        out = {key: np.asarray(jax.device_get(v))[:b] for key, v in out.items()}
        return GenerateOutput(tokens=out["tokens"], lengths=out["lengths"],
                              scores=out["scores"], neighbour_ids=out["neighbour_ids"],
                              neighbour_scores=out["neighbour_scores"])


def make_generator(model: Captioner, retriever: Any, gen_cfg: Any = None, *, k: int,
                   chunk_len: int | None = None, mesh: Mesh | None = None,
                   rules: Rules | None = None, tokenizer: Any = None,
                   text_tokenizer: Any = None, **overrides: Any) -> Generator:
    """A :class:`Generator` for ``model`` retrieving ``k`` neighbours every ``chunk_len``
    tokens (default: the captioner's). ``gen_cfg``: a whole run config, its ``generate``
    section, a mapping or a :class:`GenerateConfig`; ``overrides`` change its fields
    (``strategy="greedy"``, ``max_len=..``). ``retriever``: :class:`ExactRetriever`,
    :class:`ScannRetriever`, or None when ``k == 0``. ``tokenizer`` / ``text_tokenizer``:
    the decoder's and the text tower's tokenizers (objects or names; default: the config's
    names), which decide the special ids and how the query text is formed."""
    cfg = GenerateConfig.from_config(gen_cfg, **overrides)
    if tokenizer is None and cfg.decoder_vocab != "full":
        raise ValueError(f"this run's decoder uses its own vocabulary (decoder_vocab="
                         f"{cfg.decoder_vocab!r}): pass tokenizer= (e.g. "
                         "ravlm_jax.train.export.decoder_tokenizer(config, workdir))")
    decoder_tok = tokenizer if tokenizer is not None else cfg.tokenizer
    text_tok = text_tokenizer if text_tokenizer is not None else cfg.text_tokenizer
    if None in (cfg.bos_id, cfg.eos_id, cfg.pad_id):
        cfg = cfg.with_ids_of(_tokenizer(decoder_tok))
    query_text = QueryText(decoder_tok, text_tok, cfg)
    if not isinstance(k, (int, np.integer)) or k < 0:
        raise ValueError(f"k must be a non-negative integer, got {k!r}")
    if k > model.config.k_max:
        raise ValueError(f"k={k} exceeds the captioner's k_max={model.config.k_max}")
    if k and retriever is None:
        raise ValueError(f"k={k} needs a retriever (ExactRetriever or ScannRetriever)")
    if k and retriever.dim != model.encoder.config.embed_dim:
        raise ValueError(f"retriever holds dim {retriever.dim} vectors, the encoder "
                         f"embeds to {model.encoder.config.embed_dim}")
    if k and isinstance(retriever, ExactRetriever) and retriever.mesh != mesh:
        raise ValueError("the ExactRetriever was placed on another mesh than the generator's")
    chunk_len = int(chunk_len or model.config.chunk_len)
    if chunk_len < 1:
        raise ValueError(f"chunk_len must be >= 1, got {chunk_len}")
    return Generator(model, retriever if k else None, cfg, int(k), chunk_len, mesh,
                     query_text, rules)


def retriever_for(datastore: Any, kind: str | None = None, mesh: Mesh | None = None,
                  **kwargs: Any) -> ExactRetriever | ScannRetriever:
    """The retriever a datastore asks for (``kind`` overrides: ``exact`` or ``scann``)."""
    kind = kind or datastore.index_kind
    if kind == "exact":
        return ExactRetriever(datastore, mesh, **kwargs)
    if kind == "scann":
        return ScannRetriever.from_datastore(datastore, **kwargs)
    raise ValueError(f"unknown retriever kind {kind!r}; use 'exact' or 'scann'")


def decode_captions(tokenizer: Any, out: GenerateOutput, eos_id: int | None = None
                    ) -> list[str]:
    """Generated ids -> strings (up to EOS, special tokens dropped)."""
    eos = tokenizer.eos_id if eos_id is None else eos_id
    texts = []
    for row, n in zip(out.tokens, out.lengths, strict=True):
        row = row[:n]
        texts.append(tokenizer.decode(row[row != eos]) if row.size else "")
    return texts
