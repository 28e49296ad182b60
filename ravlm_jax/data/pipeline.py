"""The grain input pipeline: source -> shuffled, sharded, preprocessed, static-shape batches.

::

    source[i]  (sources.py example: image bytes/path, captions, tags, source_id, group_id)
      -> (i, example)                       # remember the index into the source
      -> shuffle(seed) -> repeat(epochs)    # a new order every epoch, same for every process
      -> [process_index::process_count]     # disjoint per-process shards of one global order
      -> preprocess (threads)               # decode, resize, normalise, pick + tokenise caption
      -> skip & count bad examples          # unreadable image, no caption: counted, never fatal
      -> batch(B, drop_remainder | pad)     # dict of numpy arrays with static shapes

A batch (per process, ``B = batch_size``)::

    pixels            [B, H, W, 3] float32   normalised for the tower (uint8 if normalize=False)
    {name}_ids        [B, L] int32           one entry per text field (default name: caption)
    {name}_mask       [B, L] int32
    caption_index     [B] int32              which caption of the example was used (-1: a tag)
    group_id          [B] int32              leakage group (retrieval excludes it)
    source_id         [B] int32              index into the source: source[i] is the example
    valid             [B] int32              0 for padding rows (remainder="pad" only)

Every iterator state (:meth:`Loader.get_state`) is a small JSON-serialisable dict; restoring
it continues with exactly the batches the uninterrupted stream would have produced.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from ravlm_jax.data.images import (
    ImageError,
    decode_image,
    normalize,
    resize_center_crop,
    tower_normalization,
)
from ravlm_jax.data.tokenizers import TextTokenizer

log = logging.getLogger(__name__)

CAPTION_MODES = ("first", "random", "random_with_tags")
REMAINDERS = ("drop", "pad")
_LOGGED_SKIPS = 10  # log the first few skipped examples at WARNING, the rest at DEBUG


@dataclasses.dataclass(frozen=True)
class TextField:
    """How one tokenised copy of the chosen caption is made (``{name}_ids/_mask``)."""

    tokenizer: TextTokenizer
    max_len: int
    append_eos: bool = False


@dataclasses.dataclass(frozen=True)
class Skipped:
    """Marker the preprocessor returns instead of an example it cannot use."""

    reason: str  # "bad_image" | "empty_caption"
    index: int
    message: str


# Marks the rows that equalise shard sizes in remainder="pad" mode (a str survives pickling).
_PAD = "__ravlm_jax_padding_row__"


class Preprocessor:
    """(index, example), rng -> a dict of fixed-shape arrays, or :class:`Skipped`."""

    def __init__(self, image_size: int, texts: Mapping[str, TextField], *,
                 tower: str = "clip", crop_fraction: float | None = None,
                 caption_mode: str = "first", normalize: bool = True):
        if caption_mode not in CAPTION_MODES:
            raise ValueError(f"caption_mode {caption_mode!r}: choose one of {CAPTION_MODES}")
        self.image_size, self.texts, self.tower = image_size, dict(texts), tower
        self.caption_mode, self.normalize = caption_mode, normalize
        self.norm = tower_normalization(tower)
        self.crop_fraction = self.norm.crop_fraction if crop_fraction is None else crop_fraction

    def pick_caption(self, example: Mapping[str, Any], rng: np.random.Generator
                     ) -> tuple[str, int] | None:
        """(text, caption index; -1 for a tag) or None when there is no usable caption."""
        captions = [(c.strip(), i) for i, c in enumerate(example["captions"]) if c.strip()]
        if not captions:
            return None
        if self.caption_mode == "first":
            return captions[0]
        pool = captions + ([(t.strip(), -1) for t in example.get("tags", ()) if t.strip()]
                           if self.caption_mode == "random_with_tags" else [])
        return pool[int(rng.integers(len(pool)))]

    def pixels(self, example: Mapping[str, Any]) -> np.ndarray:
        name = example.get("image_path") or f"example {example.get('source_id')}"
        image = decode_image(example["image"], name=name)
        image = resize_center_crop(image, self.image_size, crop_fraction=self.crop_fraction)
        return normalize(image, self.norm.mean, self.norm.std) if self.normalize else image

    def __call__(self, item: tuple[int, Mapping[str, Any]] | str, rng: np.random.Generator):
        if isinstance(item, str) and item == _PAD:
            return self.padding()
        index, example = item
        picked = self.pick_caption(example, rng)
        if picked is None:
            return Skipped("empty_caption", index, f"example {example.get('source_id')}: "
                                                   "no non-empty caption")
        try:
            pixels = self.pixels(example)
        except ImageError as e:
            return Skipped("bad_image", index, str(e))
        text, caption_index = picked
        out = {"pixels": pixels, "caption_index": np.int32(caption_index),
               "group_id": np.int32(example["group_id"]), "source_id": np.int32(index),
               "valid": np.int32(1)}
        for name, field in self.texts.items():
            ids, mask = field.tokenizer.encode_batch([text], field.max_len,
                                                     append_eos=field.append_eos)
            out[f"{name}_ids"], out[f"{name}_mask"] = ids[0], mask[0]  # [L], [L]
        return out

    def padding(self) -> dict[str, np.ndarray]:
        """An all-zero row with ``valid = 0`` (and pad ids), shaped like a real one."""
        dtype = np.float32 if self.normalize else np.uint8
        out = {"pixels": np.zeros((self.image_size, self.image_size, 3), dtype),
               "caption_index": np.int32(0), "group_id": np.int32(-1),
               "source_id": np.int32(-1), "valid": np.int32(0)}
        for name, field in self.texts.items():
            out[f"{name}_ids"] = np.full((field.max_len,), field.tokenizer.pad_id, np.int32)
            out[f"{name}_mask"] = np.zeros((field.max_len,), np.int32)
        return out


class _SkipAndCount(grain.IterDataset):
    """Drops :class:`Skipped` markers and counts them by reason, in the consumer thread,
    so the counts are exact and part of the iterator state."""

    def __init__(self, parent: grain.IterDataset):
        super().__init__(parent)

    def __iter__(self) -> _SkipAndCountIterator:
        return _SkipAndCountIterator(self._parent.__iter__())

    def __str__(self) -> str:
        return "SkipAndCount"


class _SkipAndCountIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator):
        super().__init__(parent)
        self.skipped: dict[str, int] = {}
        self._lock = threading.Lock()

    def __next__(self):
        while True:
            element = next(self._parent)
            if not isinstance(element, Skipped):
                return element
            with self._lock:
                self.skipped[element.reason] = self.skipped.get(element.reason, 0) + 1
                total = sum(self.skipped.values())
            (log.warning if total <= _LOGGED_SKIPS else log.debug)(
                "skipped %s: %s", element.reason, element.message)

    def get_state(self) -> dict[str, Any]:
        with self._lock:
            return {"parent": self._parent.get_state(), "skipped": dict(self.skipped)}

    def set_state(self, state: Mapping[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        with self._lock:
            self.skipped = {str(k): int(v) for k, v in state.get("skipped", {}).items()}


def _stack(rows: Sequence[Mapping[str, np.ndarray]], batch_size: int, pad_row=None
           ) -> dict[str, np.ndarray]:
    """rows -> dict of [B, ...] arrays; a short final batch is filled with ``pad_row``."""
    rows = list(rows)
    if len(rows) < batch_size and pad_row is not None:
        rows += [pad_row] * (batch_size - len(rows))
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


class _BatchIterator:
    """What the training loop needs of a loader: iteration, grain's resumable state, the
    per-process epoch length, and close. Subclasses set ``_iterator``, ``batch_size``,
    ``source_len`` and ``shard_count``."""

    _iterator: Any
    batch_size: int
    source_len: int
    shard_count: int

    def __iter__(self) -> _BatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iterator)

    def get_state(self) -> dict[str, Any]:
        return self._iterator.get_state()

    def set_state(self, state: Mapping[str, Any]) -> None:
        self._iterator.set_state(state)

    @property
    def steps_per_epoch(self) -> int:
        """Full batches per epoch on this process, before any example is skipped."""
        return self.source_len // self.shard_count // self.batch_size

    def close(self) -> None:
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()


class Loader(_BatchIterator):
    """An iterator of batches with exactly-resumable, JSON-serialisable state.

    ``get_state()`` -> ``{"parent": {...grain state...}, "skipped": {reason: count}}``;
    ``skipped`` reports the examples dropped so far (bad images, empty captions).
    """

    def __init__(self, dataset: grain.IterDataset, *, batch_size: int, source_len: int,
                 shard_index: int, shard_count: int, num_epochs: int | None):
        self.dataset = dataset
        self.batch_size, self.source_len = batch_size, source_len
        self.shard_index, self.shard_count, self.num_epochs = shard_index, shard_count, num_epochs
        self._iterator = iter(dataset)
        self._counter = _find(self._iterator, _SkipAndCountIterator)

    @property
    def skipped(self) -> dict[str, int]:
        return dict(self._counter.skipped)


def _find(iterator: grain.DatasetIterator, cls: type) -> Any:
    """The first iterator of type ``cls`` up the parent chain."""
    node = iterator
    while not isinstance(node, cls):
        parents = getattr(node, "_parents", ())
        if not parents:
            raise TypeError(f"no {cls.__name__} in the iterator chain")
        node = parents[0]
    return node


def _process_shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    if (shard_index is None) != (shard_count is None):
        raise ValueError("pass both shard_index and shard_count, or neither")
    if shard_index is None:
        import jax

        shard_index, shard_count = jax.process_index(), jax.process_count()
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} out of range for {shard_count} shards")
    return shard_index, shard_count


def make_loader(source, *, batch_size: int, image_size: int,
                texts: Mapping[str, TextField], tower: str = "clip",
                crop_fraction: float | None = None, caption_mode: str = "first",
                normalize: bool = True, seed: int = 0, shuffle: bool = True,
                num_epochs: int | None = None, remainder: str = "drop",
                shard_index: int | None = None, shard_count: int | None = None,
                num_threads: int = 4, prefetch: int = 256) -> Loader:
    """Batches of ``batch_size`` (per process) from ``source``; see the module docstring.

    ``num_epochs=None`` repeats forever (training: stop by step count). With a finite number
    of epochs every process gets the same number of rows: ``remainder="drop"`` cuts the
    global stream to a multiple of ``shard_count`` and drops the last partial batch;
    ``remainder="pad"`` pads both with ``valid = 0`` rows (evaluation, datastore builds).
    Shards default to ``jax.process_index() / jax.process_count()``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if remainder not in REMAINDERS:
        raise ValueError(f"remainder {remainder!r}: choose one of {REMAINDERS}")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
    n = len(source)
    if n == 0:
        raise ValueError(f"source {source!r} is empty")
    shard_index, shard_count = _process_shard(shard_index, shard_count)
    preprocessor = Preprocessor(image_size, texts, tower=tower, crop_fraction=crop_fraction,
                                caption_mode=caption_mode, normalize=normalize)

    ds = grain.MapDataset.source(source).map_with_index(lambda i, ex: (i % n, ex))
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    if num_epochs is not None:
        ds = _even_shards(ds, shard_count, pad=remainder == "pad")
    ds = ds[shard_index::shard_count]
    ds = ds.random_map(preprocessor, seed=seed)
    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    it = _SkipAndCount(ds.to_iter_dataset(read))
    pad_row = preprocessor.padding() if remainder == "pad" else None
    it = it.batch(batch_size, drop_remainder=remainder == "drop",
                  batch_fn=functools.partial(_stack, batch_size=batch_size, pad_row=pad_row))
    return Loader(it, batch_size=batch_size, source_len=n, shard_index=shard_index,
                  shard_count=shard_count, num_epochs=num_epochs)


def _even_shards(ds: grain.MapDataset, shard_count: int, *, pad: bool) -> grain.MapDataset:
    """A finite stream cut (or padded with markers) to a multiple of ``shard_count``."""
    total = len(ds)
    if not pad:
        return ds[: total // shard_count * shard_count]
    padded = math.ceil(total / shard_count) * shard_count
    if padded == total:
        return ds
    return grain.MapDataset.range(padded).map(lambda i: ds[i] if i < total else _PAD)


def text_fields(config: Mapping[str, Any]) -> dict[str, TextField]:
    """``{"caption": {"tokenizer": "bert", "max_len": 32, "append_eos": False}, ...}`` ->
    text fields with tokenizers built from local files."""
    from ravlm_jax.data.tokenizers import get_tokenizer

    return {name: TextField(get_tokenizer(spec["tokenizer"]), int(spec["max_len"]),
                            bool(spec.get("append_eos", False)))
            for name, spec in config.items()}


def loader_from_config(data_config: Mapping[str, Any], split: str, *, batch_size: int,
                       seed: int = 0, shuffle: bool | None = None,
                       num_epochs: int | None = None, remainder: str | None = None,
                       shard_index: int | None = None, shard_count: int | None = None
                       ) -> tuple[Any, Loader]:
    """(source, loader) from a ``data`` config section (dict or ConfigDict).

    Keys: the source keys of :func:`sources.open_source`, plus ``image_size``, ``tower``,
    ``crop_fraction``, ``caption_mode``, ``texts`` (see :func:`text_fields`),
    ``num_threads``. Training splits shuffle and repeat; others default to one padded pass.
    """
    from ravlm_jax.data.sources import open_source

    cfg = data_config.to_dict() if hasattr(data_config, "to_dict") else dict(data_config)
    source = open_source(cfg, split)
    train = split == "train"
    loader = make_loader(
        source, batch_size=batch_size, image_size=int(cfg.get("image_size", 96)),
        texts=text_fields(cfg.get("texts", {"caption": {"tokenizer": "bert", "max_len": 32}})),
        tower=cfg.get("tower", "clip"), crop_fraction=cfg.get("crop_fraction"),
        caption_mode=cfg.get("caption_mode", "random" if train else "first"),
        normalize=cfg.get("normalize", True), seed=seed,
        shuffle=train if shuffle is None else shuffle,
        num_epochs=num_epochs if num_epochs is not None or train else 1,
        remainder=remainder or ("drop" if train else "pad"), shard_index=shard_index,
        shard_count=shard_count, num_threads=int(cfg.get("num_threads", 4)))
    return source, loader


class IndexLoader(_BatchIterator):
    """Shuffled batches of example rows only: ``{"source_id": [B] int32}``.

    For steps that read everything else from device-resident tables and feature caches (a
    run whose towers are frozen and cached): same shuffling per epoch, per-process shards
    and exactly-resumable JSON state as :class:`Loader`, without decoding a single image.
    """

    def __init__(self, n: int, *, batch_size: int, seed: int = 0,
                 shard_index: int | None = None, shard_count: int | None = None,
                 rows: Sequence[int] | None = None):
        """Rows ``0..n-1``, or only ``rows`` (a subset, e.g. the other folds)."""
        if rows is not None:
            rows = np.asarray(rows, np.int32)
            n = len(rows)
        if n < 1 or batch_size < 1:
            raise ValueError(f"IndexLoader needs n >= 1 and batch_size >= 1 (got {n}, "
                             f"{batch_size})")
        self.shard_index, self.shard_count = _process_shard(shard_index, shard_count)
        self.batch_size, self.source_len = batch_size, n
        ds = grain.MapDataset.range(n)
        if rows is not None:
            ds = ds.map(lambda i: rows[i])
        ds = ds.shuffle(seed=seed).repeat(None)
        ds = ds[self.shard_index::self.shard_count].batch(batch_size, drop_remainder=True)
        ds = ds.map(lambda rows: {"source_id": np.asarray(rows, np.int32)})
        self._iterator = iter(ds.to_iter_dataset())

    @property
    def skipped(self) -> dict[str, int]:
        return {}
