"""SmallCap loader: the tiny checkpoint saved by SmallCap's own code
(tests/fixtures/smallcap_tiny, a torch .bin read without torch) reproduces its encoder
states and decoder logits; reduced cross-attention shapes; trainable / frozen counts;
prompt facts; errors."""

import json
import shutil

import numpy as np
import pytest
from flax import nnx

from ravlm_jax.checkpoints.io import CheckpointError
from ravlm_jax.checkpoints.smallcap import load_smallcap, smallcap_frozen, smallcap_prompt


@pytest.fixture(scope="module")
def smallcap(fixtures_dir):
    vision, decoder, info = load_smallcap(fixtures_dir / "smallcap_tiny")
    return vision, decoder, info, dict(np.load(fixtures_dir / "smallcap_tiny" / "golden.npz"))


@nnx.jit
def _decode(dec, ids, memory):
    return dec(ids, memory=memory)[0]


@pytest.mark.parity
def test_decoder_reproduces_smallcap_logits_from_encoder_states(smallcap):
    _, dec, _, g = smallcap
    np.testing.assert_allclose(np.asarray(_decode(dec, g["ids"], g["enc"])), g["logits"],
                               atol=1e-4)


@pytest.mark.parity
def test_vision_tower_reproduces_encoder_states_and_logits(smallcap):
    vision, dec, _, g = smallcap
    pixels = g["px"].transpose(0, 2, 3, 1)  # NCHW -> NHWC
    tokens, _ = nnx.jit(lambda v, x: v(x))(vision, pixels)
    np.testing.assert_allclose(np.asarray(tokens), g["enc"], atol=1e-4)
    np.testing.assert_allclose(np.asarray(_decode(dec, g["ids"], tokens)), g["logits"],
                               atol=1e-4)


@pytest.mark.parity
def test_cached_decoding_matches_smallcap(smallcap):
    _, dec, _, g = smallcap
    kv = dec.encode_memory(g["enc"])
    step = nnx.jit(lambda d, i, c: d(i, memory_kv=kv, cache=c))
    logits, cache = step(dec, g["ids"][:, :5], dec.init_cache(1, 9))
    out = [np.asarray(logits)]
    for i in range(5, 9):
        logits, cache = step(dec, g["ids"][:, i:i + 1], cache)
        out.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(out, 1), g["logits"], atol=1e-4)


def test_reduced_cross_attention_and_untied_head(smallcap):
    _, dec, info, g = smallcap
    cfg = info["decoder_config"]
    assert (cfg.cross_attention_reduce_factor, cfg.cross_width, cfg.memory_width) == (4, 8, 32)
    assert not cfg.tie_word_embeddings and dec.lm_head is not None
    attn = dec.blocks[0].cross_attn
    assert attn.query.kernel.get_value().shape == (32, 8)
    assert attn.key.kernel.get_value().shape == attn.value.kernel.get_value().shape == (32, 8)
    assert attn.out.kernel.get_value().shape == (8, 32)
    assert dec.encode_memory(g["enc"]).keys[0].shape == (1, 4, 17, 2)  # [B, H, M, D]


def test_only_cross_attention_projections_are_trainable(smallcap):
    _, _, info, _ = smallcap
    # per layer: q_attn 32*8+8, c_attn 32*16+16, c_proj 8*32+32 = 1080; two layers
    assert info["param_counts"]["decoder"]["trainable"] == 2 * 1080
    assert info["param_counts"]["vision"]["trainable"] == 0
    assert smallcap_frozen("blocks.0.ln_cross_attn.scale")
    assert not smallcap_frozen("blocks.1.cross_attn.out.kernel")
    assert smallcap_frozen("blocks.1.self_attn.out.kernel") and smallcap_frozen("wte.embedding")


def test_info_has_the_prompt_and_generation_facts(smallcap):
    _, _, info, _ = smallcap
    assert (info["k"], info["max_length"], info["rag"]) == (4, 25, True)
    assert info["retrieval_encoder"] == "RN50x64"
    assert info["generation"]["num_beams"] == 3 and info["generation"]["eos_token_id"] == 13
    prompt = smallcap_prompt(["a dog", "a cat", "a cow", "a pig", "a hen"], info["k"])
    assert prompt == ("Similar images show\n\na dog\n\na cat\n\na cow\n\na pig.\n\n"
                      "This image shows ")


def test_rejects_other_model_types_and_stray_tensors(fixtures_dir, tmp_path):
    src = fixtures_dir / "smallcap_tiny"
    shutil.copy(src / "pytorch_model.bin", tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "vision-encoder"}))
    with pytest.raises(CheckpointError, match="expected 'smallcap'"):
        load_smallcap(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "decoder": None}))
    with pytest.raises(CheckpointError, match="encoder / decoder"):
        load_smallcap(tmp_path)
