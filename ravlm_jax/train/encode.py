"""A datastore from any image-caption split, encoded by a trained run's dual encoder.

``python -m ravlm_jax.retrieval.datastore build --encoder WORKDIR --out DIR [--split S]
[--config CONFIG]`` lands here: SmallCap's training-free adaptation (index another
dataset's captions, point ``infer.py --datastore`` at it) without re-running ``train.py``.
The rows are what the ``datastore`` stage writes (caption keys from the text path, the
decoder's tokens, group ids, image thumbnails under ``DIR/../images/SPLIT``), so the result
loads wherever the run's own datastore does and carries the same encoder fingerprint.
"""

from __future__ import annotations

import os
import types
from pathlib import Path

import jax
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from ravlm_jax.data.sources import open_source
from ravlm_jax.retrieval.datastore import BuildSources, dual_encoder_fingerprint
from ravlm_jax.train.export import decoder_tokenizer, load_model, model_dir, text_tokenizer
from ravlm_jax.train.tables import SplitCaptions, build_tables


def build_sources_from_run(config: ml_collections.ConfigDict | None,
                           encoder: str | os.PathLike, *, split: str = "train",
                           out: str | os.PathLike, progress: bool = True) -> BuildSources:
    """Rows of ``split`` of ``config.data`` (default: the run's own dataset) keyed by the
    trained encoder in ``encoder`` (a ``train.py`` workdir or its ``model/``)."""
    from ravlm_jax.train.loop import _text_keys, datastore_rows  # noqa: PLC0415 (cycle)

    directory = model_dir(encoder)
    model, run_config = load_model(directory)
    data = (config if config is not None and "data" in config else run_config).data
    source = open_source(data, split)
    captions = SplitCaptions.read(source, int(data.get("max_captions", 1)))
    if not len(source):
        raise ValueError(f"split {split!r} of {data.get('name', 'the dataset')} is empty")
    run = types.SimpleNamespace(
        config=run_config, model=model, mesh=_mesh_of(model), progress=progress,
        dec_tok=decoder_tokenizer(run_config, directory), workdir=Path(out).absolute().parent)
    tables = build_tables(captions, text_tokenizer(run_config), run.dec_tok,
                          text_len=int(run_config.data.texts.caption.max_len),
                          dec_len=int(run_config.model.get("caption_len", 24)),
                          chunk_len=int(run_config.model.captioner.chunk_len))
    batches = datastore_rows(run, source, tables, _text_keys(run, tables, None), split)
    return BuildSources(encode_fn=lambda b: b["keys"], batches=batches,
                        fingerprint=dual_encoder_fingerprint(model.encoder, run_config.model),
                        tokenizer_name=run.dec_tok.name, total_batches=len(batches),
                        pad_id=run.dec_tok.pad_id,
                        build_config={"encoder": str(directory), "split": split,
                                      "data": data.to_dict()})


def _mesh_of(model) -> Mesh:
    """The mesh ``load_model`` placed the parameters on."""
    leaf = jax.tree.leaves(nnx.state(model))[0]
    return leaf.sharding.mesh
