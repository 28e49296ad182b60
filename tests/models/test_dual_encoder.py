"""The dual encoder with real towers (tiny ViT + tiny BERT): sharded == single device, and a
golden snapshot of every parameter's partition spec."""

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ravlm_jax.models.dual_encoder import DualEncoder, DualEncoderConfig
from ravlm_jax.models.text import Bert, BertConfig
from ravlm_jax.models.vit import ViT, ViTConfig
from ravlm_jax.sharding import batch_sharding, named_specs, shard_module

GOLDEN = Path(__file__).parent / "golden" / "dual_encoder_specs.json"


def tiny_dual_encoder(seed=0):
    rngs = nnx.Rngs(seed)
    vit = ViT(ViTConfig(image_size=32, patch_size=8, width=32, layers=2, heads=4, mlp_dim=64),
              rngs=rngs)
    bert = Bert(BertConfig(vocab_size=64, width=32, layers=2, heads=4, mlp_dim=64, max_len=16),
                rngs=rngs)
    return DualEncoder(vit, bert, DualEncoderConfig(image_width=32, text_width=32, embed_dim=16),
                       rngs=rngs)


def _inputs(b=8):
    key = jax.random.key(0)
    pixels = jax.random.normal(key, (b, 32, 32, 3))
    ids = jax.random.randint(jax.random.fold_in(key, 1), (b, 12), 1, 64)
    lens = jnp.arange(b) % 12  # row 0 has no text: image-only query
    mask = (jnp.arange(12)[None] < lens[:, None]).astype(jnp.int32)
    return pixels, ids, mask


def test_partition_specs_match_golden(mesh8):
    """Regenerate deliberately with RAVLM_UPDATE_GOLDEN=1 when the layout is meant to
    change; an accidental change shows up as a diff here."""
    model = nnx.eval_shape(tiny_dual_encoder)
    specs = named_specs(model, mesh8)
    if os.environ.get("RAVLM_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps(specs, indent=1, sort_keys=True) + "\n")
    assert specs == json.loads(GOLDEN.read_text())


@pytest.mark.parity
def test_sharded_forward_equals_single_device(mesh8):
    model = tiny_dual_encoder()
    pixels, ids, mask = _inputs()
    fn = nnx.jit(lambda m, p, i, k: (m.encode_query(i, k, p), m.encode_image(p),
                                     m.encode_text(i, k), m.image_tokens(p)))
    want = fn(model, pixels, ids, mask)
    sharded = shard_module(model, mesh8)
    kernel = sharded.text_tower.layers[0].mlp.fc1.kernel.get_value()
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "model")
    placed = [jax.device_put(x, batch_sharding(mesh8, x.ndim)) for x in (pixels, ids, mask)]
    with jax.set_mesh(mesh8):
        got = fn(sharded, *placed)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5)
    np.testing.assert_allclose(np.asarray(want[0][0]), np.asarray(want[1][0]), atol=1e-6)
