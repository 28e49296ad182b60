"""The chunked teacher-forcing layout equals decoding each chunk against its own memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ravlm_jax.models.captioner import Captioner, CaptionerConfig
from ravlm_jax.models.decoder import Decoder, DecoderConfig
from ravlm_jax.models.dual_encoder import DualEncoder, DualEncoderConfig
from ravlm_jax.models.text import Bert, BertConfig
from ravlm_jax.models.vit import ViT, ViTConfig

VOCAB = 50


def tiny_captioner(seed=0, chunk_len=3, k_max=4, neighbour_layers=1, neighbour_next=True,
                   copy_head=False):
    rngs = nnx.Rngs(seed)
    vit = ViT(ViTConfig(image_size=16, patch_size=8, width=16, layers=1, heads=2, mlp_dim=32),
              rngs=rngs)
    bert = Bert(BertConfig(vocab_size=VOCAB, width=16, layers=1, heads=2, mlp_dim=32,
                           max_len=32), rngs=rngs)
    enc = DualEncoder(vit, bert, DualEncoderConfig(image_width=16, text_width=16, embed_dim=8),
                      rngs=rngs)
    dec = Decoder(DecoderConfig(vocab_size=VOCAB, n_positions=32, width=24, layers=2, heads=2,
                                memory_width=24, cross_attention=True), rngs=rngs)
    return Captioner(enc, dec, CaptionerConfig(image_width=16, k_max=k_max, neighbour_len=5,
                                               chunk_len=chunk_len,
                                               neighbour_layers=neighbour_layers,
                                               neighbour_next=neighbour_next,
                                               copy_head=copy_head), rngs=rngs)


def _inputs(b=2, t=7, c=3, k=2, ln=5):
    key = jax.random.key(1)
    ids = jax.random.randint(key, (b, t), 1, VOCAB)
    pixels = jax.random.normal(jax.random.fold_in(key, 1), (b, 16, 16, 3))
    nb = jax.random.randint(jax.random.fold_in(key, 2), (b, c, k, ln), 1, VOCAB)
    lens = jax.random.randint(jax.random.fold_in(key, 3), (b, c, k), 0, ln + 1)
    nb_mask = (jnp.arange(ln) < lens[..., None]).astype(jnp.int32)
    return ids, pixels, nb, nb_mask


@pytest.mark.parametrize("layers,copy_head", [(0, False), (1, False), (0, True), (1, True)])
def test_teacher_forcing_equals_per_chunk_decoding(layers, copy_head):
    model = tiny_captioner(neighbour_layers=layers, copy_head=copy_head)
    ids, pixels, nb, nb_mask = _inputs()
    image_tokens = model.encoder.image_tokens(pixels)
    logits = model(ids, image_tokens, nb, nb_mask)
    cl = model.config.chunk_len
    image = model.image_kv(image_tokens)
    cache = model.decoder.init_cache(ids.shape[0], 16)
    for c in range(nb.shape[1]):
        kv, mask = model.chunk_memory_kv(image, nb[:, c], nb_mask[:, c])
        raw, raw_mask = model.chunk_memory(model.image_memory(image_tokens), nb[:, c],
                                           nb_mask[:, c])
        np.testing.assert_array_equal(np.asarray(mask), np.asarray(raw_mask))
        chunk = ids[:, c * cl:(c + 1) * cl]
        if chunk.shape[1] == 0:
            break
        step_logits, _, cache = model.decode(chunk, kv, mask, cache)
        np.testing.assert_allclose(np.asarray(step_logits),
                                   np.asarray(logits[:, c * cl:(c + 1) * cl]), atol=1e-5)


def test_neighbours_change_only_their_chunk():
    model = tiny_captioner()
    ids, pixels, nb, nb_mask = _inputs()
    tokens = model.encoder.image_tokens(pixels)
    full = jnp.ones_like(nb_mask)
    base = model(ids, tokens, nb, full)
    nb2 = nb.at[:, 1].set((nb[:, 1] + 7) % VOCAB)
    changed = model(ids, tokens, nb2, full)
    cl = model.config.chunk_len
    base, changed = np.asarray(base), np.asarray(changed)
    np.testing.assert_allclose(base[:, :cl], changed[:, :cl], atol=1e-6)
    # (later chunks see chunk 1's states through self-attention, as in generation)
    assert np.abs(base[:, cl:2 * cl] - changed[:, cl:2 * cl]).max() > 1e-4


def test_zero_neighbours_and_bad_shapes():
    model = tiny_captioner()
    ids, pixels, nb, nb_mask = _inputs()
    tokens = model.encoder.image_tokens(pixels)
    # k = 0 (no retrieval) equals all neighbour slots masked out
    empty = model(ids, tokens, nb[:, :, :0], nb_mask[:, :, :0])
    masked = model(ids, tokens, nb, jnp.zeros_like(nb_mask))
    np.testing.assert_allclose(np.asarray(empty), np.asarray(masked), atol=1e-5)
    with pytest.raises(ValueError, match="do not cover"):
        model(ids, tokens, nb[:, :2], nb_mask[:, :2])
    with pytest.raises(ValueError, match="exceed k_max"):
        model.neighbour_memory(jnp.zeros((1, 5, 5), jnp.int32), jnp.ones((1, 5, 5)))


@pytest.mark.parametrize("nxt", [False, True])
def test_vocabulary_lookup_kv_equals_projecting_tokens(nxt):
    """With no neighbour layers, K/V come from a per-vocabulary table when that is cheaper
    (here 4*4*5 = 80 neighbour tokens > vocabulary 50): same numbers as projecting."""
    model = tiny_captioner(neighbour_layers=0, neighbour_next=nxt)
    key = jax.random.key(5)
    ids = jax.random.randint(key, (4, 4, 5), 0, VOCAB)
    mask = (jax.random.uniform(jax.random.fold_in(key, 1), (4, 4, 5)) > 0.3).astype(jnp.int32)
    fast, fast_mask = model.neighbour_kv(ids, mask)
    slow = model.decoder.encode_memory(model.neighbour_memory(ids, mask))
    for a, b in zip(fast.keys + fast.values, slow.keys + slow.values, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(fast_mask), np.asarray(mask.reshape(4, 20)) > 0)
    # tables built once and given (generation), also where the batch alone would project
    tables = jax.jit(model.neighbour_tables)()
    for rows in (4, 1):
        given, _ = model.neighbour_kv(ids[:rows, :3], mask[:rows, :3], tables)
        direct = model.decoder.encode_memory(model.neighbour_memory(ids[:rows, :3],
                                                                    mask[:rows, :3]))
        for a, b in zip(given.keys + given.values, direct.keys + direct.values, strict=True):
            assert a.shape == b.shape == (rows, 2, 15, 12)  # [B, H, k*Ln, D]
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


@pytest.mark.parametrize("copy_head", [False, True])
def test_vocab_major_step_is_the_decode_step_transposed(copy_head):
    model = tiny_captioner(neighbour_layers=0, copy_head=copy_head)
    ids, pixels, nb, nb_mask = _inputs()
    kv, mask = model.chunk_memory_kv(model.image_kv(model.encoder.image_tokens(pixels)),
                                     nb[:, 0], nb_mask[:, 0])
    cache = model.decoder.init_cache(ids.shape[0], 16)
    if copy_head:  # its scores mix in the copy distribution: not the LM head's logits
        with pytest.raises(ValueError, match="no copy head"):
            model.decode_step_vocab_major(ids[:, :1], kv, mask, cache)
        return
    want, _, want_cache = model.decode(ids[:, :1], kv, mask, cache)  # [B, 1, V]
    got, got_cache = model.decode_step_vocab_major(ids[:, :1], kv, mask, cache)  # [V, B]
    np.testing.assert_allclose(np.asarray(got).T, np.asarray(want[:, 0]), atol=1e-5)
    for a, b in zip(jax.tree.leaves(got_cache), jax.tree.leaves(want_cache), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_neighbour_tables_need_linear_neighbours():
    with pytest.raises(ValueError, match="neighbour_layers=0"):
        tiny_captioner(neighbour_layers=1).neighbour_tables()


def test_copy_head_is_a_distribution_that_can_only_add_retrieved_tokens():
    model = tiny_captioner(neighbour_layers=0, copy_head=True)
    ids, pixels, nb, nb_mask = _inputs()
    tokens = model.encoder.image_tokens(pixels)
    logp = np.asarray(model(ids, tokens, nb, nb_mask))  # [B, T, V] log-probabilities
    np.testing.assert_allclose(np.exp(logp).sum(-1), 1.0, atol=1e-5)
    # with the gate shut (g = 0) all mass sits on the visible neighbour tokens of the chunk
    model.copy_gate.bias.set_value(jnp.full((1,), -1e4))
    p = np.exp(np.asarray(model(ids, tokens, nb, nb_mask)))
    cl = model.config.chunk_len
    nb_np, mask_np = np.asarray(nb), np.asarray(nb_mask).astype(bool)
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1]):
            seen = set(nb_np[b, t // cl][mask_np[b, t // cl]].tolist())
            if seen:
                assert p[b, t, sorted(seen)].sum() == pytest.approx(1.0, abs=1e-5)
            else:  # nothing to copy: the LM head's distribution, whatever the gate
                np.testing.assert_allclose(p[b, t].sum(), 1.0, atol=1e-5)
    # k = 0: exactly the plain LM head
    empty = model(ids, tokens, nb[:, :, :0], nb_mask[:, :, :0])
    logits, _ = model.decoder(ids, memory_kv=model.image_kv(tokens)[0])
    np.testing.assert_allclose(np.asarray(empty), np.asarray(logits), atol=1e-5)
