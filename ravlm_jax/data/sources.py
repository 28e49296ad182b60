"""Random-access data sources that all yield the same example structure.

An *example* is a dict:

- ``image``: encoded image bytes (TFDS), an image path (local formats) or uint8 ``[H, W, 3]``;
  decoding happens in the pipeline, where an unreadable image is skipped and counted.
- ``captions``: list of str, the first is the primary caption (may be empty: the pipeline
  skips and counts examples without a usable caption).
- ``tags``: list of str, extra reference texts (OpenMoji tags; empty elsewhere unless given);
  CIDEr uses ``captions + tags`` as references and training may sample them per config.
- ``source_id``: the dataset's own id of the example (OpenMoji hexcode, COCO image id, the
  JSONL ``id`` or line number) as str or int.
- ``group_id``: int, the leakage group (near-twins share one; splits never cut a group and
  retrieval can exclude a query's own group).
- ``image_path``: str, where the image came from ("" for TFDS records).

A source is a grain ``RandomAccessDataSource``: ``len(source)`` and ``source[i]``, plus
``references(i)``. Sources:

- :func:`openmoji_source`: the embedded OpenMoji dataset (built on first use, < 1 minute).
- :class:`TfdsSource`: any TFDS image-caption dataset by name, with feature keys from the
  config. ``coco_captions`` is read this way; *building* it needs TensorFlow (``pip install
  'ravlm_jax[coco]'``, then ``tfds build coco_captions --data_dir DIR``); reading it back
  with ``tfds.data_source`` does not.
- :class:`LocalSource`: a JSONL file of ``{"image": path, "captions": [...]}`` (paths relative
  to the file; optional ``tags``, ``group``, ``id``, ``split``), or a folder of images with a
  ``captions.tsv`` / ``captions.txt`` file of ``filename<TAB>caption`` lines (one line per
  caption; a Flickr-style ``#N`` suffix on the filename is ignored).
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ravlm_jax.data.splits import DEFAULT_FRACTIONS, SPLITS, assign_splits

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTION_FILES = ("captions.tsv", "captions.txt", "captions.jsonl")


@runtime_checkable
class Source(Protocol):
    """What the pipeline reads: one split, random access, the common example structure."""

    name: str
    split: str

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...

    def references(self, index: int) -> list[str]: ...


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _texts(value: Any) -> list[str]:
    """A str, bytes or sequence of them (or None) -> list of str."""
    if value is None:
        return []
    if isinstance(value, (str, bytes)):
        return [_text(value)]
    return [_text(v) for v in value]


def _scalar(value: Any) -> Any:
    """numpy scalars -> int/str, bytes -> str."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if hasattr(value, "item"):
        return value.item()
    return value


def _group_int(value: Any) -> int:
    """A group key as int32-safe int; strings hash with crc32 (a collision only merges two
    groups, which errs on the side of less leakage)."""
    value = _scalar(value)
    if isinstance(value, int) and 0 <= value < 2**31:
        return value
    return zlib.crc32(str(value).encode()) & 0x7FFFFFFF


def _lookup(example: Mapping[str, Any], key: str) -> Any:
    """``a/b`` -> example["a"]["b"]; also accepts a flat key containing ``/``."""
    if key in example:
        return example[key]
    node: Any = example
    for part in key.split("/"):
        if not isinstance(node, Mapping) or part not in node:
            raise KeyError(f"feature {key!r} not in example with keys {sorted(example)}")
        node = node[part]
    return node


def _nested(key: str, value: Any) -> dict[str, Any]:
    parts = key.split("/")
    node: Any = value
    for part in reversed(parts):
        node = {part: node}
    return node


class TfdsSource:
    """One split of a built TFDS dataset, read with ``tfds.data_source`` (no TensorFlow).

    Images are not decoded here (``SkipDecoding``) so the pipeline decodes them safely.
    ``group_key`` defaults to ``id_key`` (one group per image); ``id_key`` defaults to the
    record index.
    """

    def __init__(self, name: str, split: str = "train", data_dir: str | os.PathLike | None = None,
                 *, image_key: str = "image", captions_key: str = "captions",
                 tags_key: str | None = None, id_key: str | None = None,
                 group_key: str | None = None, image_path_key: str | None = None,
                 download: bool = False, builder=None):
        import tensorflow_datasets as tfds

        self.name, self.split = name, split
        self.image_key, self.captions_key, self.tags_key = image_key, captions_key, tags_key
        self.id_key, self.image_path_key = id_key, image_path_key
        self.group_key = group_key if group_key is not None else id_key
        decoders = _nested(image_key, tfds.decode.SkipDecoding())
        where = os.fspath(data_dir) if data_dir else "the default TFDS data dir"
        if builder is None:
            try:
                builder = tfds.builder(name, data_dir=os.fspath(data_dir) if data_dir else None)
            except tfds.core.registered.DatasetNotFoundError as e:
                raise ValueError(f"unknown TFDS dataset {name!r} (not registered, not found "
                                 f"in {where}): {' '.join(str(e).split())[:200]}") from None
        if not builder.is_prepared():
            if not download:
                raise ValueError(
                    f"TFDS dataset {name!r} is not available in {where}: build it once with "
                    f"`tfds build {name} --data_dir DIR` (coco_captions needs TensorFlow: "
                    "pip install 'ravlm_jax[coco]') or set download=True")
            try:
                builder.download_and_prepare()
            except ModuleNotFoundError as e:
                raise ModuleNotFoundError(
                    f"building TFDS dataset {name!r} needs {e.name!r}; for coco_captions "
                    "install the coco extra: pip install 'ravlm_jax[coco]'") from None
        self._data = builder.as_data_source(split=split, decoders=decoders)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, split={self.split!r}, n={len(self)})"

    def _convert(self, index: int, raw: Mapping[str, Any]) -> dict[str, Any]:
        source_id = _scalar(_lookup(raw, self.id_key)) if self.id_key else index
        group = _lookup(raw, self.group_key) if self.group_key else index
        path = _text(_lookup(raw, self.image_path_key)) if self.image_path_key else ""
        return {"image": _lookup(raw, self.image_key),
                "captions": _texts(_lookup(raw, self.captions_key)),
                "tags": _texts(_lookup(raw, self.tags_key)) if self.tags_key else [],
                "source_id": source_id, "group_id": _group_int(group), "image_path": path}

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._convert(index, self._data[index])

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        raws = self._data.__getitems__(list(indices))
        return [self._convert(i, r) for i, r in zip(indices, raws, strict=True)]

    def references(self, index: int) -> list[str]:
        ex = self[index]
        return [t for t in ex["captions"] + ex["tags"] if t.strip()]


def openmoji_source(data_dir: str | os.PathLike, split: str = "train", *,
                    image_size: int = 96, limit: int | None = None, seed: int = 0,
                    build: bool = True) -> TfdsSource:
    """The embedded OpenMoji dataset; built under ``data_dir`` on first use if ``build``."""
    from ravlm_jax.data import openmoji

    b = openmoji.builder(data_dir, image_size, limit=limit, seed=seed)
    if not b.is_prepared():
        if not build:
            raise ValueError(f"OpenMoji {b.builder_config.name} is not built in {data_dir}; "
                             f"run python -m ravlm_jax.data.openmoji --data_dir {data_dir}")
        b = openmoji.build(data_dir, image_size, limit=limit, seed=seed)
    return TfdsSource("openmoji", split, data_dir, id_key="source_id", group_key="group_id",
                      tags_key="tags", builder=b)


class LocalSource:
    """Records from a JSONL file or an image folder, one split of them.

    Splits: a ``split`` field on the records selects them; without one, records are split by
    group (``group`` field, else the image path) with ``seed`` and ``fractions``; ``all``
    keeps every record.
    """

    def __init__(self, records: Sequence[Mapping[str, Any]], base_dir: str | os.PathLike,
                 split: str = "train", *, name: str = "local", seed: int = 0,
                 fractions: Sequence[float] = DEFAULT_FRACTIONS):
        self.name, self.split, self.base_dir = name, split, Path(base_dir)
        self.images_without_captions = 0  # counted by from_folder
        rows = [self._normalise(i, r) for i, r in enumerate(records)]
        first_of: dict[Any, int] = {}
        for i, r in enumerate(rows):
            r["group_id"] = first_of.setdefault(r.pop("_group"), i)  # first record index
        if split == "all":
            self._rows = rows
            return
        if any(r["_split"] is not None for r in rows):
            names = [r["_split"] or "train" for r in rows]
        else:
            if split not in SPLITS:
                raise ValueError(f"split {split!r}: records have no split field, so it must "
                                 f"be one of {SPLITS} or 'all'")
            names = assign_splits([r["group_id"] for r in rows], seed, fractions)
        self._rows = [r for r, s in zip(rows, names, strict=True) if s == split]
        if not self._rows:
            raise ValueError(f"{name}: split {split!r} is empty (have {sorted(set(names))})")

    def _normalise(self, line: int, record: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(record, Mapping) or "image" not in record:
            raise ValueError(f"{self.name} record {line + 1}: needs an 'image' field")
        captions = record.get("captions", record.get("caption"))
        if captions is not None and not isinstance(captions, (str, list, tuple)):
            raise ValueError(f"{self.name} record {line + 1}: 'captions' must be a list of "
                             "strings")
        image = record["image"]
        path = image if os.path.isabs(image) else os.fspath(self.base_dir / image)
        return {"image": path, "image_path": path, "captions": _texts(captions),
                "tags": _texts(record.get("tags")),
                "source_id": _scalar(record.get("id", line)),
                "_group": ("group", _scalar(record["group"])) if "group" in record
                else ("image", os.path.normpath(path)),
                "_split": record.get("split")}

    def __len__(self) -> int:
        return len(self._rows)

    def __repr__(self) -> str:
        return f"LocalSource({self.name!r}, split={self.split!r}, n={len(self)})"

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self._rows[index]
        return {k: v for k, v in row.items() if not k.startswith("_")}

    def references(self, index: int) -> list[str]:
        row = self._rows[index]
        return [t for t in row["captions"] + row["tags"] if t.strip()]

    @classmethod
    def from_jsonl(cls, path: str | os.PathLike, split: str = "train", **kwargs) -> LocalSource:
        path = Path(path)
        records = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        return cls(records, path.parent, split, name=kwargs.pop("name", path.name), **kwargs)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, split: str = "train", *,
                    captions_file: str | None = None, **kwargs) -> LocalSource:
        folder = Path(folder)
        names = [captions_file] if captions_file else CAPTION_FILES
        found = [folder / n for n in names if (folder / n).is_file()]
        if not found:
            raise ValueError(f"{folder}: no captions file (looked for {', '.join(names)})")
        if found[0].suffix == ".jsonl":
            return cls.from_jsonl(found[0], split, **kwargs)
        captions: dict[str, list[str]] = {}
        for n, line in enumerate(found[0].read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip() or line.startswith("#"):
                continue
            name, sep, text = line.partition("\t")
            if not sep:
                raise ValueError(f"{found[0]}:{n}: expected 'filename<TAB>caption'")
            captions.setdefault(name.split("#")[0].strip(), []).append(text.strip())
        records = [{"image": name, "captions": caps, "id": name}
                   for name, caps in captions.items()]
        source = cls(records, folder, split, name=kwargs.pop("name", folder.name), **kwargs)
        on_disk = {p.name for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
        source.images_without_captions = len(on_disk - set(captions))
        return source


def open_source(config: Mapping[str, Any], split: str) -> Source:
    """A source from a data config (a dict or ``ml_collections.ConfigDict``).

    ``kind``: ``openmoji`` (``data_dir``, ``image_size``, ``limit``), ``tfds`` (``name``,
    ``data_dir``, ``image_key``, ``captions_key``, ``tags_key``, ``id_key``, ``group_key``,
    ``download``), ``jsonl`` (``path``) or ``folder`` (``path``, ``captions_file``); local
    kinds also take ``seed`` and ``split_fractions``.
    """
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    kind = cfg.get("kind", "openmoji")
    if kind == "openmoji":
        return openmoji_source(_required(cfg, "data_dir", kind), split,
                               image_size=cfg.get("image_size", 96), limit=cfg.get("limit"),
                               seed=cfg.get("split_seed", 0))
    if kind == "tfds":
        return TfdsSource(_required(cfg, "name", kind), split, cfg.get("data_dir"),
                          image_key=cfg.get("image_key", "image"),
                          captions_key=cfg.get("captions_key", "captions"),
                          tags_key=cfg.get("tags_key"), id_key=cfg.get("id_key"),
                          group_key=cfg.get("group_key"),
                          image_path_key=cfg.get("image_path_key"),
                          download=cfg.get("download", False))
    local = {"seed": cfg.get("split_seed", 0),
             "fractions": tuple(cfg.get("split_fractions", DEFAULT_FRACTIONS))}
    if kind == "jsonl":
        return LocalSource.from_jsonl(_required(cfg, "path", kind), split, **local)
    if kind == "folder":
        return LocalSource.from_folder(_required(cfg, "path", kind), split,
                                       captions_file=cfg.get("captions_file"), **local)
    raise ValueError(f"unknown data kind {kind!r}; choose openmoji, tfds, jsonl or folder")


def _required(cfg: Mapping[str, Any], key: str, kind: str) -> Any:
    if not cfg.get(key):
        raise ValueError(f"data config of kind {kind!r} needs {key!r}")
    return cfg[key]


# COCO captions through TFDS (building needs TensorFlow: the ``coco`` extra).
COCO_CAPTIONS = {"kind": "tfds", "name": "coco_captions/2017", "image_key": "image",
                 "captions_key": "captions/text", "id_key": "image/id",
                 "group_key": "image/id", "image_path_key": "image/filename"}
