import jax
import numpy as np
import pytest
from flax import nnx

from ravlm_jax.config import load_config
from ravlm_jax.models.factory import build_captioner
from ravlm_jax.sharding import create_sharded
from ravlm_jax.train.export import ModelNotFound, export_model, load_model


def test_export_then_load_roundtrip_sharded(tmp_path, mesh8):
    config = load_config("configs/tiny.py")
    config.mesh.shape = (2, 2, 2)
    model = create_sharded(lambda: build_captioner(config.model, nnx.Rngs(3)), mesh8)
    export_model(tmp_path / "model", model, config)
    loaded, cfg = load_model(tmp_path, mesh8)
    assert cfg.model.decoder.width == config.model.decoder.width
    a = jax.tree.leaves(nnx.state(model))
    b = jax.tree.leaves(nnx.state(loaded))
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        assert x.sharding.is_equivalent_to(y.sharding, x.ndim)
    assert not list(tmp_path.glob("*.tmp-*"))


def test_load_model_missing_is_one_line(tmp_path):
    with pytest.raises(ModelNotFound, match="holds no trained model"):
        load_model(tmp_path)
