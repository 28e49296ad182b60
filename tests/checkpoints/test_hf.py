import numpy as np
import pytest

from ravlm_jax.checkpoints.hf import load_pretrained
from ravlm_jax.checkpoints.io import CheckpointError


@pytest.mark.parity
def test_load_pretrained_dispatches_and_reproduces_smallcap(fixtures_dir):
    pre = load_pretrained(fixtures_dir / "smallcap_tiny")
    assert pre.model_type == "smallcap" and set(pre.modules) == {"vision", "decoder"}
    golden = np.load(fixtures_dir / "smallcap_tiny" / "golden.npz")
    enc, _ = pre.modules["vision"](np.transpose(golden["px"], (0, 2, 3, 1)))
    logits, _ = pre.modules["decoder"](golden["ids"], memory=enc)
    np.testing.assert_allclose(np.asarray(logits), golden["logits"], atol=1e-4)
    dec = pre.counts["decoder"]
    assert dec["total"] == dec["trainable"] + dec["frozen"] and 0 < dec["trainable"] < dec["total"]
    assert pre.counts["vision"]["trainable"] == 0
    assert "trainable" in pre.summary()


def test_load_pretrained_other_types(fixtures_dir):
    assert set(load_pretrained(fixtures_dir / "clip_tiny").modules) == {"vision", "text"}
    assert set(load_pretrained(fixtures_dir / "bert_tiny").modules) == {"text"}
    gpt2 = load_pretrained(fixtures_dir / "gpt2_tiny")
    assert set(gpt2.modules) == {"decoder"} and gpt2.counts["decoder"]["frozen"] == 0


def test_load_pretrained_errors(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(CheckpointError, match="unsupported model_type 'llama'"):
        load_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained(tmp_path / "nope" / "deeper")
