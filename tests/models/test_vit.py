"""ViT: config parsing, shapes, the patch einsum against a real convolution, input checks,
and the sharded forward on the 2x2x2 mesh against one device. HF parity lives in
tests/checkpoints/test_clip.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from ravlm_jax.checkpoints.clip import load_clip_vision
from ravlm_jax.models.vit import ViT, ViTConfig
from ravlm_jax.sharding import batch_sharding, logical_axes_of, shard_module

TINY = ViTConfig(image_size=32, patch_size=8, width=32, layers=2, heads=4, mlp_dim=37)
HF_VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                 num_attention_heads=4, image_size=32, patch_size=8, hidden_act="quick_gelu",
                 layer_norm_eps=1e-5, num_channels=3)


def _pixels(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 32, 32, 3)).astype(np.float32)


def test_config_from_hf_vision_and_clip_dicts():
    assert ViTConfig.from_hf(HF_VISION) == TINY
    assert ViTConfig.from_hf({"vision_config": HF_VISION, "text_config": {}}) == TINY


def test_config_from_hf_fills_hf_defaults():
    cfg = ViTConfig.from_hf({"patch_size": 16})  # ViT-B/16 with everything else default
    assert (cfg.image_size, cfg.patch_size, cfg.width, cfg.layers, cfg.heads, cfg.mlp_dim) == (
        224, 16, 768, 12, 12, 3072)
    assert cfg.num_patches == 196


def test_config_rejects_patch_that_does_not_tile():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        ViTConfig(image_size=30, patch_size=8, width=32, layers=1, heads=4, mlp_dim=8)


def test_shapes_and_logical_axes():
    vit = ViT(TINY, rngs=nnx.Rngs(0))
    tokens, pooled = vit(_pixels(2))
    assert tokens.shape == (2, 17, 32) and pooled.shape == (2, 32)
    assert logical_axes_of(vit.patch_embed) == ("conv", "conv", "channels", "embed")
    assert logical_axes_of(vit.layers[0].mlp.fc1.kernel) == ("embed", "mlp")


def test_patch_embedding_is_a_stride_patch_convolution():
    vit = ViT(TINY, rngs=nnx.Rngs(1))
    x = _pixels(2, seed=1)
    conv = jax.lax.conv_general_dilated(  # [B, 4, 4, W]
        x, vit.patch_embed[...], window_strides=(8, 8), padding="VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    ours = vit.embed(x)[:, 1:] - vit.position_embedding.embedding[...][1:]
    np.testing.assert_allclose(ours, conv.reshape(2, 16, 32), atol=1e-5)
    cls = vit.embed(x)[:, 0] - vit.position_embedding.embedding[...][0]
    np.testing.assert_allclose(cls, np.broadcast_to(vit.class_embedding[...], (2, 32)),
                               atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (2, 24, 24, 3), (32, 32, 3)])
def test_rejects_wrong_pixel_layout(shape):
    vit = ViT(TINY, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="NHWC"):
        vit(jnp.zeros(shape))


def test_sharded_forward_matches_single_device(fixtures_dir, mesh8):
    vit = load_clip_vision(fixtures_dir / "clip_tiny")
    x = _pixels(4, seed=2)
    want_tokens, want_pooled = vit(x)

    sharded = shard_module(vit, mesh8)
    assert sharded.layers[0].attn.query.kernel[...].sharding.spec == P("fsdp", "model")
    with jax.set_mesh(mesh8):
        xs = jax.device_put(x, batch_sharding(mesh8, 4))
        tokens, pooled = nnx.jit(lambda m, p: m(p))(sharded, xs)
    assert tokens.sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_allclose(tokens, want_tokens, atol=1e-5)
    np.testing.assert_allclose(pooled, want_pooled, atol=1e-5)


def test_bfloat16_compute_stays_close_to_float32():
    """Parameters stay float32; ``dtype`` only sets the compute dtype (TPU runs bfloat16)."""
    f32 = ViT(TINY, rngs=nnx.Rngs(3))
    bf16 = ViT(TINY, rngs=nnx.Rngs(3), dtype=jnp.bfloat16)
    assert bf16.patch_embed[...].dtype == jnp.float32
    x = _pixels(2, seed=3)
    (t32, p32), (t16, p16) = f32(x), bf16(x)
    assert t16.dtype == jnp.bfloat16 and p16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(t16, np.float32), t32, atol=0.1, rtol=0.05)
    np.testing.assert_allclose(np.asarray(p16, np.float32), p32, atol=0.1, rtol=0.05)
