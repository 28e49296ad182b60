"""The trained model as ``infer.py`` and evaluation load it.

``WORKDIR/model/`` holds ``config.json`` (the run's resolved config) and ``params/`` (every
parameter of the captioner, frozen towers included, as one orbax checkpoint). It is written
to a temporary directory and renamed, so a half-written export never looks valid.
``WORKDIR/datastore/`` (the retrieval issue's format) sits beside it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from ravlm_jax.data.tokenizers import SubsetTokenizer, get_tokenizer
from ravlm_jax.models.captioner import Captioner
from ravlm_jax.models.factory import build_captioner
from ravlm_jax.sharding import make_mesh, state_shardings

VOCAB_FILE = "decoder_vocab.json"


class ModelNotFound(FileNotFoundError):
    pass


def text_tokenizer(config: ml_collections.ConfigDict):
    return get_tokenizer(config.data.texts.caption.tokenizer)


def decoder_tokenizer(config: ml_collections.ConfigDict, directory: str | os.PathLike):
    """The decoder's tokenizer: the named one, or (``model.decoder_vocab = "train"``) the
    subset of it saved as ``decoder_vocab.json`` in ``directory`` (workdir or model dir)."""
    base = get_tokenizer(config.model.tokenizer)
    if config.model.get("decoder_vocab", "full") == "full":
        return base
    path = Path(directory) / VOCAB_FILE
    if not path.is_file():
        raise ModelNotFound(f"{path} is missing: the decoder vocabulary of this run")
    return SubsetTokenizer.load(base, path)


def model_dir(path: str | os.PathLike) -> Path:
    """A run workdir or a model dir -> the model dir; one-line error if neither."""
    path = Path(path)
    for candidate in (path / "model", path):
        if (candidate / "config.json").is_file() and (candidate / "params").is_dir():
            return candidate
    raise ModelNotFound(f"{path} holds no trained model (expected {path}/model/config.json "
                        "and params/, written at the end of train.py)")


def export_model(directory: str | os.PathLike, model: Captioner,
                 config: ml_collections.ConfigDict, vocab_file: Path | None = None) -> Path:
    directory = Path(directory).absolute()
    tmp = directory.with_name(directory.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))
    if vocab_file is not None:
        shutil.copy(vocab_file, tmp / VOCAB_FILE)
    state = nnx.to_pure_dict(nnx.state(model))
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp / "params", state)
        ckpt.wait_until_finished()
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory


def load_config_json(path: str | os.PathLike) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(json.loads((model_dir(path) / "config.json").read_text()))


def load_model(path: str | os.PathLike, mesh: jax.sharding.Mesh | None = None
               ) -> tuple[Captioner, ml_collections.ConfigDict]:
    """Rebuild the captioner from its config (abstractly: no random init runs) and restore
    its parameters straight into their shardings on ``mesh`` (default: all devices on
    ``data``, parameters replicated or split per the logical-axis rules)."""
    directory = model_dir(path).absolute()  # orbax wants absolute paths
    config = load_config_json(directory)
    mesh = mesh or make_mesh(tuple(config.mesh.shape) if "mesh" in config else None)
    abstract = nnx.eval_shape(lambda: build_captioner(config.model, nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh)
    target = jax.tree.map(
        lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
        nnx.to_pure_dict(abstract_state), nnx.to_pure_dict(shardings))
    with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore(directory / "params", target)
    nnx.replace_by_pure_dict(abstract_state, restored)
    return nnx.merge(graphdef, abstract_state), config
