"""Datastore rows: a split's captions keyed by a trained dual encoder.

The ``datastore`` stage of ``train.py`` and ``python -m ravlm_jax.retrieval.datastore build
--encoder WORKDIR --out DIR [--split S] [--config CONFIG]`` both write these rows (caption
keys from the text path, the decoder's tokens, group ids, image thumbnails under
``DIR/../images/SPLIT``). The command is SmallCap's training-free adaptation: index another
dataset's captions with a finished run's encoder and point ``infer.py --datastore`` at it;
the result carries the run's encoder fingerprint and loads wherever its own datastore does.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from ravlm_jax.data.sources import open_source
from ravlm_jax.retrieval.datastore import BuildSources, dual_encoder_fingerprint
from ravlm_jax.sharding import make_mesh
from ravlm_jax.train import features as feats
from ravlm_jax.train.export import decoder_tokenizer, load_model, model_dir, text_tokenizer
from ravlm_jax.train.tables import CaptionTables, SplitCaptions, caption_tables, payload_ids


def text_keys(encoder: nnx.Module, tables: CaptionTables, features: dict | None, mesh: Mesh,
              progress: bool = True) -> np.ndarray:
    """Unit key vectors [N, R, D] of the captions in ``tables`` (from cached text-tower
    features when ``features`` has them)."""
    graphdef, state = nnx.split(encoder)

    if features is not None and "text_pooled" in features:
        def fn(state, pooled):
            return nnx.merge(graphdef, state).embed_text_pooled(pooled)

        pooled = features["text_pooled"]  # [N, R, Wt]
        flat = pooled.reshape(-1, pooled.shape[-1])  # [N*R, Wt]
        out = feats.batched_apply(fn, state, (flat,), 256, mesh)
        return out.reshape(*pooled.shape[:-1], -1)

    def fn(state, ids, mask):
        return nnx.merge(graphdef, state).encode_text(ids, mask)

    ids, mask = tables.text_ids, tables.text_mask  # [N, R, L]
    out = feats.batched_apply(fn, state, (ids.reshape(-1, ids.shape[-1]),
                                          mask.reshape(-1, mask.shape[-1])), 64, mesh,
                              "datastore keys", progress)
    return out.reshape(*ids.shape[:-1], -1)


def datastore_rows(source, tables: CaptionTables, keys: np.ndarray, split: str, dec_tok: Any,
                   neighbour_len: int, root: Path) -> list[dict[str, Any]]:
    """Batches for ``build_datastore``: one row per caption (example row, caption r), its
    thumbnail written once to ``root/images/SPLIT`` (referenced from a datastore directory
    inside ``root``)."""
    rows = [(i, r) for i in range(tables.size) for r in range(int(tables.count[i]))]
    image_dir = root / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    batches = []
    for start in range(0, len(rows), 512):
        part = rows[start:start + 512]
        texts = [tables.texts[i][r] for i, r in part]
        ids, _ = payload_ids(dec_tok, texts, neighbour_len)
        refs = []
        for i, _ in part:
            img = image_dir / f"{i}.png"
            if not img.exists():
                _write_thumbnail(source, i, img)
            refs.append(f"../images/{split}/{i}.png" if img.exists() else "")
        batches.append({
            "keys": np.stack([keys[i, r] for i, r in part]).astype(np.float32),
            "text": texts, "token_ids": ids,
            "source_id": np.array([i for i, _ in part], np.int64) + (
                0 if split == "train" else 1 << 40),
            "group_id": np.array([tables.group_id[i] for i, _ in part], np.int64),
            "image_ref": refs,
        })
    return batches


def _write_thumbnail(source, i: int, path: Path) -> None:
    from PIL import Image

    from ravlm_jax.data.images import ImageError, decode_image

    try:
        img = decode_image(source[i]["image"], name=f"row {i}")
    except ImageError:
        return
    Image.fromarray(img).save(path)


def build_sources_from_run(config: ml_collections.ConfigDict | None,
                           encoder: str | os.PathLike, *, split: str = "train",
                           out: str | os.PathLike, progress: bool = True) -> BuildSources:
    """Rows of ``split`` of ``config.data`` (default: the run's own dataset) keyed by the
    trained encoder in ``encoder`` (a ``train.py`` workdir or its ``model/``)."""
    directory = model_dir(encoder)
    mesh = make_mesh()
    model, run_config = load_model(directory, mesh)
    data = (config if config is not None and "data" in config else run_config).data
    source = open_source(data, split)
    if not len(source):
        raise ValueError(f"split {split!r} of {data.get('name', 'the dataset')} is empty")
    captions = SplitCaptions.read(source, int(data.get("max_captions", 1)))
    dec_tok = decoder_tokenizer(run_config, directory)
    tables = caption_tables(run_config, captions, text_tokenizer(run_config), dec_tok)
    keys = text_keys(model.encoder, tables, None, mesh, progress)
    batches = datastore_rows(source, tables, keys, split, dec_tok,
                             int(run_config.model.captioner.neighbour_len),
                             Path(out).absolute().parent)
    return BuildSources(encode_fn=lambda b: b["keys"], batches=batches,
                        fingerprint=dual_encoder_fingerprint(model.encoder, run_config.model),
                        tokenizer_name=dec_tok.name, total_batches=len(batches),
                        pad_id=dec_tok.pad_id,
                        build_config={"encoder": str(directory), "split": split,
                                      "data": data.to_dict()})
