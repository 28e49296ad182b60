"""Dual-encoder fusion and losses against numpy references (towers stubbed by tiny MLPs;
the real towers are tested in test_dual_encoder.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ravlm_jax.models.dual_encoder import (
    DualEncoder,
    DualEncoderConfig,
    clip_loss,
    l2_normalize,
    siglip_loss,
)
from ravlm_jax.models.layers import Embed, Linear


class PixelTower(nnx.Module):
    def __init__(self, rngs, hw=4):
        self.proj = Linear(3 * hw, 8, rngs=rngs, init_std=0.5)
        self.hw = hw

    def __call__(self, pixels):
        b = pixels.shape[0]
        tokens = self.proj(pixels.reshape(b, -1, 3 * self.hw))  # [B, HW/hw, 8]
        return tokens, tokens.mean(1)


class BagTower(nnx.Module):
    def __init__(self, rngs):
        self.embed = Embed(20, 6, rngs=rngs, init_std=1.0)

    def __call__(self, ids, mask):
        tok = self.embed(ids) * mask[..., None]
        return tok, tok.sum(1) / jnp.maximum(mask.sum(1, keepdims=True), 1)


def _model(fusion=True):
    rngs = nnx.Rngs(0)
    return DualEncoder(PixelTower(rngs), BagTower(rngs),
                       DualEncoderConfig(image_width=8, text_width=6, embed_dim=5,
                                         fusion=fusion), rngs=rngs)


def _unit_rows(rng, n, d):
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _np_log_softmax(x, axis):
    x = x - x.max(axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis, keepdims=True))


def test_clip_loss_matches_numpy():
    rng = np.random.default_rng(0)
    a, b = _unit_rows(rng, 6, 4), _unit_rows(rng, 6, 4)
    logits = np.exp(2.0) * a @ b.T
    ref = -0.5 * (np.diag(_np_log_softmax(logits, 1)).mean()
                  + np.diag(_np_log_softmax(logits, 0)).mean())
    got = clip_loss(jnp.asarray(a), jnp.asarray(b), jnp.asarray(2.0))
    np.testing.assert_allclose(float(got), ref, rtol=1e-5)
    # the temperature is clamped at 100
    big = clip_loss(jnp.asarray(a), jnp.asarray(b), jnp.asarray(10.0))
    clamped = clip_loss(jnp.asarray(a), jnp.asarray(b), jnp.asarray(np.log(100.0)))
    np.testing.assert_allclose(float(big), float(clamped), rtol=1e-6)


def test_siglip_loss_matches_numpy():
    rng = np.random.default_rng(1)
    a, b = _unit_rows(rng, 5, 3), _unit_rows(rng, 5, 3)
    z = np.exp(1.5) * a @ b.T - 2.0
    y = 2 * np.eye(5) - 1
    ref = np.log1p(np.exp(-y * z)).sum(1).mean()
    got = siglip_loss(jnp.asarray(a), jnp.asarray(b), jnp.asarray(1.5), jnp.asarray(-2.0))
    np.testing.assert_allclose(float(got), ref, rtol=1e-5)


def test_query_modes_are_unit_and_rowwise():
    model = _model()
    pixels = jax.random.uniform(jax.random.key(0), (3, 4, 4, 3))
    ids = jnp.array([[1, 2, 3], [4, 5, 0], [0, 0, 0]])
    mask = jnp.array([[1, 1, 1], [1, 1, 0], [0, 0, 0]])
    u_img = model.encode_image(pixels)
    u_txt = model.encode_text(ids, mask)
    q = model.encode_query(ids, mask, pixels)
    for x in (u_img, u_txt[:2], q):  # (row 2 of u_txt embeds no text at all)
        np.testing.assert_allclose(np.linalg.norm(np.asarray(x), axis=1), 1.0, atol=1e-5)
    # row 2 has no text: the query is the image embedding exactly
    np.testing.assert_allclose(np.asarray(q[2]), np.asarray(u_img[2]), atol=1e-6)
    # fusion starts as the normalised sum (F is zero-initialised, softplus(w) = 1)
    ref = l2_normalize(u_img[:2] + u_txt[:2])
    np.testing.assert_allclose(np.asarray(q[:2]), np.asarray(ref), atol=1e-5)
    np.testing.assert_allclose(np.asarray(model.encode_query(None, None, pixels)),
                               np.asarray(u_img), atol=1e-6)
    np.testing.assert_allclose(np.asarray(model.encode_query(ids, mask, None)),
                               np.asarray(u_txt), atol=1e-6)
    with pytest.raises(ValueError, match="needs text"):
        model.encode_query(None, None, None)


def test_contrastive_training_improves_alignment():
    """A few SGD steps on the CLIP loss must pull matched pairs together."""
    model = _model()
    pixels = jax.random.normal(jax.random.key(1), (6, 2, 2, 3))
    ids = jnp.arange(18).reshape(6, 3) % 20
    mask = jnp.ones_like(ids)

    def loss_fn(m):
        return m.contrastive_loss(m.encode_image(pixels), m.encode_text(ids, mask))

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def step(params):
        loss, grads = jax.value_and_grad(
            lambda p: loss_fn(nnx.merge(graphdef, p, rest)))(params)
        return loss, jax.tree.map(lambda p, g: p - 0.5 * g, params, grads)

    first, params = step(params)
    for _ in range(150):
        loss, params = step(params)
    assert float(loss) < 0.5 * float(first)
    trained = nnx.merge(graphdef, params, rest)
    sim = trained.encode_image(pixels) @ trained.encode_text(ids, mask).T  # [6, 6]
    np.testing.assert_array_equal(np.argmax(np.asarray(sim), 1), np.arange(6))
    with pytest.raises(ValueError, match="unknown contrastive"):
        model.contrastive_loss(model.encode_image(pixels), model.encode_image(pixels), "nope")
