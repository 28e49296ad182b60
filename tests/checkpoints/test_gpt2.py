"""GPT-2 loader: logits against Hugging Face (tests/fixtures/gpt2_tiny, built by
tools/parity_fixtures/gpt2.py), key layouts (with / without ``transformer.``, old mask
buffers, tied / untied head) and one-line errors for checkpoints that do not fit."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
from flax import nnx

from ravlm_jax.checkpoints.gpt2 import decoder_from_state_dict, load_gpt2
from ravlm_jax.checkpoints.io import CheckpointError, load_state_dict
from ravlm_jax.models.decoder import DecoderConfig


@pytest.fixture(scope="module")
def xattn(fixtures_dir):
    decoder, cfg = load_gpt2(fixtures_dir / "gpt2_tiny")
    return decoder, cfg, dict(np.load(fixtures_dir / "gpt2_tiny" / "golden.npz"))


@nnx.jit
def _fwd(dec, ids, memory=None, memory_mask=None, attention_mask=None):
    return dec(ids, memory=memory, memory_mask=memory_mask, attention_mask=attention_mask)[0]


def test_config_from_fixture(xattn):
    _, cfg, _ = xattn
    assert cfg == DecoderConfig(vocab_size=99, n_positions=64, width=32, layers=2, heads=4,
                                cross_attention=True, tie_word_embeddings=True)


@pytest.mark.parity
def test_cross_attention_logits_match_hf(xattn):
    dec, _, g = xattn
    got = _fwd(dec, g["input_ids"], g["encoder_hidden_states"])
    np.testing.assert_allclose(np.asarray(got), g["logits"], atol=1e-4)
    masked = _fwd(dec, g["input_ids"], g["encoder_hidden_states"], g["encoder_attention_mask"])
    np.testing.assert_allclose(np.asarray(masked), g["logits_memory_masked"], atol=1e-4)


@pytest.mark.parity
def test_left_padded_logits_match_hf_generate_positions(xattn):
    dec, _, g = xattn
    got = _fwd(dec, g["input_ids"], g["encoder_hidden_states"],
               attention_mask=g["attention_mask"])
    real = g["attention_mask"].astype(bool)
    np.testing.assert_allclose(np.asarray(got)[real], g["logits_left_padded"][real], atol=1e-4)


@pytest.mark.parity
def test_cached_decoding_matches_hf(xattn):
    dec, _, g = xattn
    ids, mem = g["input_ids"], g["encoder_hidden_states"]
    kv = dec.encode_memory(mem)
    step = nnx.jit(lambda d, i, c: d(i, memory_kv=kv, cache=c))
    logits, cache = step(dec, ids[:, :8], dec.init_cache(2, 12))
    out = [np.asarray(logits)]
    for i in range(8, 12):
        logits, cache = step(dec, ids[:, i:i + 1], cache)
        out.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(out, 1), g["logits"], atol=1e-4)


@pytest.mark.parity
def test_plain_untied_lm_matches_hf(fixtures_dir):
    path = fixtures_dir / "gpt2_tiny" / "plain_untied"
    dec, cfg = load_gpt2(path)
    assert not cfg.cross_attention and not cfg.tie_word_embeddings
    assert dec.lm_head is not None
    g = np.load(path / "golden.npz")
    np.testing.assert_allclose(np.asarray(_fwd(dec, g["input_ids"])), g["logits"], atol=1e-4)


@pytest.mark.parity
def test_gpt2model_keys_and_old_mask_buffers(fixtures_dir, xattn):
    """GPT2Model keys (no ``transformer.``) plus the mask buffers older checkpoints carry."""
    _, cfg, g = xattn
    sd = load_state_dict(fixtures_dir / "gpt2_tiny")
    bare = {k.removeprefix("transformer."): v for k, v in sd.items()}
    for i in range(cfg.layers):
        bare[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.uint8))
        bare[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
        bare[f"h.{i}.crossattention.bias"] = np.tril(np.ones((1, 1, 64, 64), np.uint8))
    dec = decoder_from_state_dict(cfg, bare)
    got = _fwd(dec, g["input_ids"], g["encoder_hidden_states"])
    np.testing.assert_allclose(np.asarray(got), g["logits"], atol=1e-4)


def test_stored_copy_of_tied_head_is_ignored(fixtures_dir, xattn):
    _, cfg, _ = xattn
    sd = load_state_dict(fixtures_dir / "gpt2_tiny")
    sd["lm_head.weight"] = sd["transformer.wte.weight"].copy()
    dec = decoder_from_state_dict(cfg, sd)
    assert dec.lm_head is None


def test_checkpoints_that_do_not_fit_raise(fixtures_dir, xattn):
    _, cfg, _ = xattn
    sd = load_state_dict(fixtures_dir / "gpt2_tiny")
    with pytest.raises(CheckpointError, match="unexpected tensors"):
        decoder_from_state_dict(cfg, {**sd, "transformer.h.0.attn.extra": np.zeros(3)})
    with pytest.raises(CheckpointError, match="unexpected tensors.*crossattention"):
        decoder_from_state_dict(dataclasses.replace(cfg, cross_attention=False), sd)
    missing = {k: v for k, v in sd.items() if k != "transformer.h.1.mlp.c_fc.bias"}
    with pytest.raises(CheckpointError, match="h.1.mlp.c_fc.bias"):
        decoder_from_state_dict(cfg, missing)
    with pytest.raises(CheckpointError, match="no lm_head.weight"):
        decoder_from_state_dict(dataclasses.replace(cfg, tie_word_embeddings=False), sd)
    with pytest.raises(CheckpointError, match="shape"):
        decoder_from_state_dict(dataclasses.replace(cfg, mlp_dim=64), sd)
    with pytest.raises(CheckpointError, match="no GPT-2 weights"):
        decoder_from_state_dict(cfg, sd, prefix="decoder.")


def test_load_rejects_non_gpt2_config(fixtures_dir, tmp_path):
    shutil.copy(fixtures_dir / "gpt2_tiny" / "model.safetensors", tmp_path)
    cfg = json.loads((fixtures_dir / "gpt2_tiny" / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(CheckpointError, match="not a usable GPT-2 config.*llama"):
        load_gpt2(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_gpt2(tmp_path / "nope")
