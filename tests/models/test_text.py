"""CLIPText and Bert: configs, pooling rules, masking invariances, input checks, and the
sharded CLIP text forward on the 2x2x2 mesh. HF parity lives in tests/checkpoints/."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ravlm_jax.checkpoints.clip import load_clip
from ravlm_jax.models.text import (
    Bert,
    BertConfig,
    CLIPText,
    CLIPTextConfig,
    l2_normalize,
    masked_mean,
)
from ravlm_jax.sharding import batch_sharding, shard_module

CLIP_TINY = CLIPTextConfig(vocab_size=99, width=32, layers=2, heads=4, mlp_dim=37, max_len=16,
                           eos_token_id=50)
BERT_TINY = BertConfig(vocab_size=99, width=32, layers=2, heads=4, mlp_dim=37, max_len=64)


def _ids(shape, seed=0, high=99):
    return np.random.default_rng(seed).integers(3, high, shape).astype(np.int32)


def test_clip_text_config_from_hf():
    hf = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=37, max_position_embeddings=16, eos_token_id=50)
    assert CLIPTextConfig.from_hf(hf) == CLIP_TINY
    assert CLIPTextConfig.from_hf({"text_config": hf, "vision_config": {}}) == CLIP_TINY
    default = CLIPTextConfig.from_hf({})
    assert (default.vocab_size, default.width, default.max_len, default.eos_token_id) == (
        49408, 512, 77, 49407)
    with pytest.raises(ValueError, match="one int"):
        CLIPTextConfig.from_hf({"eos_token_id": [1, 2]})


def test_bert_config_from_hf_rejects_relative_positions():
    assert BertConfig.from_hf({}).width == 768
    with pytest.raises(ValueError, match="absolute"):
        BertConfig.from_hf({"position_embedding_type": "relative_key"})


def test_eos_positions_first_eos_and_legacy_argmax():
    ids = jnp.array([[5, 90, 50, 7, 50], [50, 3, 4, 98, 1]])
    new = CLIPText(CLIP_TINY, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(new.eos_positions(ids), [2, 0])
    legacy = CLIPText(dataclasses.replace(CLIP_TINY, eos_token_id=2), rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(legacy.eos_positions(ids), [1, 3])


def test_clip_text_is_causal_and_pools_at_eos():
    model = CLIPText(CLIP_TINY, rngs=nnx.Rngs(0))
    ids = _ids((2, 8))
    ids[ids == 50] = 51
    ids[:, 4] = 50
    tokens, pooled = model(ids)
    assert tokens.shape == (2, 8, 32) and pooled.shape == (2, 32)
    np.testing.assert_allclose(pooled, tokens[:, 4])
    later = ids.copy()
    later[:, 6] = 7  # a change after position 4 cannot reach positions <= 4
    tokens2, pooled2 = model(later)
    np.testing.assert_allclose(tokens2[:, :5], tokens[:, :5], atol=1e-6)
    np.testing.assert_allclose(pooled2, pooled, atol=1e-6)
    assert not np.allclose(tokens2[:, 6], tokens[:, 6])


def test_clip_text_padding_mask_hides_padded_keys():
    model = CLIPText(CLIP_TINY, rngs=nnx.Rngs(0))
    ids = _ids((1, 8))
    mask = np.array([[1, 1, 1, 1, 1, 0, 1, 1]])  # a hole: position 5 is hidden from 6, 7
    other = ids.copy()
    other[0, 5] = (ids[0, 5] + 1) % 99
    a, _ = model(ids, mask)
    b, _ = model(other, mask)
    np.testing.assert_allclose(a[:, [0, 1, 2, 3, 4, 6, 7]], b[:, [0, 1, 2, 3, 4, 6, 7]],
                               atol=1e-6)


@pytest.mark.parametrize("bad, match", [
    (lambda ids: ids[:, :, None], r"\[B, T\]"),
    (lambda ids: ids.astype(np.float32), "integer"),
    (lambda ids: np.concatenate([ids, ids, ids], 1), "exceeds"),
])
def test_clip_text_rejects_bad_ids(bad, match):
    model = CLIPText(CLIP_TINY, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=match):
        model(bad(_ids((2, 8))))
    with pytest.raises(ValueError, match="mask shape"):
        model(_ids((2, 8)), np.ones((2, 7), np.int32))


def test_bert_ignores_padded_positions():
    model = Bert(BERT_TINY, rngs=nnx.Rngs(0))
    ids = _ids((2, 9))
    mask = np.ones((2, 9), np.int32)
    mask[1, 5:] = 0
    other = ids.copy()
    other[1, 5:] = 0
    tokens, mean = model(ids, mask)
    tokens2, mean2 = model(other, mask)
    np.testing.assert_allclose(tokens2[1, :5], tokens[1, :5], atol=1e-5)
    np.testing.assert_allclose(mean2, mean, atol=1e-5)
    np.testing.assert_allclose(mean[1], np.asarray(tokens[1, :5]).mean(0), atol=1e-5)
    emb = model.sentence_embedding(ids, mask)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=1e-6)


def test_masked_mean_and_normalize_edge_cases():
    x = jnp.arange(12.0).reshape(1, 4, 3)
    np.testing.assert_allclose(masked_mean(x, jnp.array([[1, 0, 1, 0]])), [[3.0, 4.0, 5.0]])
    np.testing.assert_array_equal(masked_mean(x, jnp.zeros((1, 4))), [[0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(l2_normalize(jnp.zeros((1, 3))), [[0.0, 0.0, 0.0]])


def test_bert_pooler_is_explicit():
    without = Bert(BERT_TINY, rngs=nnx.Rngs(0))
    assert without.pooler is None
    with pytest.raises(ValueError, match="no pooler"):
        without.pooled_cls(jnp.zeros((1, 3, 32)))
    with_pooler = Bert(dataclasses.replace(BERT_TINY, pooler=True), rngs=nnx.Rngs(0))
    tokens, _ = with_pooler(_ids((2, 5)))
    assert with_pooler.pooled_cls(tokens).shape == (2, 32)


def test_sharded_clip_text_matches_single_device(fixtures_dir, mesh8):
    _, text, _ = load_clip(fixtures_dir / "clip_tiny")
    golden = np.load(fixtures_dir / "clip_tiny" / "golden.npz")
    ids = np.concatenate([golden["input_ids"], golden["input_ids"][:1]]).astype(np.int32)
    mask = np.concatenate([golden["attention_mask"], golden["attention_mask"][:1]])
    want_tokens, want_pooled = text(ids, mask)

    sharded = shard_module(text, mesh8)
    with jax.set_mesh(mesh8):
        put = lambda a: jax.device_put(a, batch_sharding(mesh8, 2))
        tokens, pooled = nnx.jit(lambda m, i, k: m(i, k))(sharded, put(ids), put(mask))
    np.testing.assert_allclose(tokens, want_tokens, atol=1e-5)
    np.testing.assert_allclose(pooled, want_pooled, atol=1e-5)


@pytest.mark.parametrize("cls, config", [(CLIPText, CLIP_TINY), (Bert, BERT_TINY)])
def test_bfloat16_compute_dtype(cls, config):
    ids = _ids((2, 6))
    ids[:, -1] = 50
    f32 = cls(config, rngs=nnx.Rngs(4))
    bf16 = cls(config, rngs=nnx.Rngs(4), dtype=jnp.bfloat16)
    (t32, _), (t16, _) = f32(ids), bf16(ids)
    assert t16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(t16, np.float32), t32, atol=0.1, rtol=0.05)
