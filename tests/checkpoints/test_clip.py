"""CLIP loaders against Hugging Face outputs (tests/fixtures/clip_tiny, built by
tools/parity_fixtures/clip.py with transformers 5), the SmallCap vision prefix, the hub-id path
through a fake offline hub cache, and the errors a broken checkpoint must raise."""

import json
import shutil

import huggingface_hub.constants
import numpy as np
import pytest

from ravlm_jax.checkpoints.clip import (
    load_clip,
    load_clip_vision,
    text_from_state_dict,
    vision_from_state_dict,
)
from ravlm_jax.checkpoints.io import CheckpointError, load_state_dict

TOL = 1e-4


def _nhwc(pixels_nchw):
    return np.transpose(pixels_nchw, (0, 2, 3, 1))


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def clip(fixtures_dir):
    return load_clip(fixtures_dir / "clip_tiny")


@pytest.fixture(scope="module")
def golden(fixtures_dir):
    return dict(np.load(fixtures_dir / "clip_tiny" / "golden.npz"))


def _max_err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float32) - b)))


@pytest.mark.parity
def test_vision_matches_hf(clip, golden):
    vision, _, _ = clip
    tokens, pooled = vision(_nhwc(golden["pixel_values"]))
    assert _max_err(tokens, golden["vision_last_hidden_state"]) <= TOL
    assert _max_err(pooled, golden["vision_pooler_output"]) <= TOL


@pytest.mark.parity
def test_text_matches_hf(clip, golden):
    _, text, _ = clip
    tokens, pooled = text(golden["input_ids"], golden["attention_mask"])
    assert _max_err(tokens, golden["text_last_hidden_state"]) <= TOL
    assert _max_err(pooled, golden["text_pooler_output"]) <= TOL


@pytest.mark.parity
def test_text_legacy_eos_pooling_matches_hf(fixtures_dir, golden):
    """Same weights under a pre-#24773 config (eos_token_id 2): argmax-of-ids pooling."""
    cfg = json.loads((fixtures_dir / "clip_tiny" / "config.json").read_text())
    cfg["text_config"]["eos_token_id"] = 2
    legacy = text_from_state_dict(cfg, load_state_dict(fixtures_dir / "clip_tiny"))
    _, pooled = legacy(golden["input_ids"], golden["attention_mask"])
    assert _max_err(pooled, golden["text_pooler_output_legacy"]) <= TOL
    assert _max_err(golden["text_pooler_output_legacy"], golden["text_pooler_output"]) > 0.1


@pytest.mark.parity
def test_projections_and_logits_match_hf(clip, golden):
    vision, text, extras = clip
    assert extras["visual_projection"].shape == (32, 24)
    assert extras["text_projection"].shape == (32, 24)
    _, v = vision(_nhwc(golden["pixel_values"]))
    _, t = text(golden["input_ids"], golden["attention_mask"])
    image_embeds = _unit(np.asarray(v) @ extras["visual_projection"])
    text_embeds = _unit(np.asarray(t) @ extras["text_projection"])
    assert _max_err(image_embeds, golden["image_embeds"]) <= TOL
    assert _max_err(text_embeds, golden["text_embeds"]) <= TOL
    logits = np.exp(extras["logit_scale"]) * image_embeds @ text_embeds.T
    assert _max_err(logits, golden["logits_per_image"]) <= 1e-3  # scale ~14.3 x 1e-4


@pytest.mark.parity
@pytest.mark.parametrize("subdir", ["vision_only", "."])
def test_load_clip_vision_from_vision_model_and_clip_model(fixtures_dir, golden, subdir):
    """transformers 5 saves CLIPVisionModel keys without a prefix; CLIPModel under
    vision_model.; both load to the same tower."""
    vision = load_clip_vision(fixtures_dir / "clip_tiny" / subdir)
    tokens, _ = vision(_nhwc(golden["pixel_values"]))
    assert _max_err(tokens, golden["vision_last_hidden_state"]) <= TOL


@pytest.mark.parity
def test_vision_from_smallcap_state_dict(fixtures_dir):
    root = fixtures_dir / "smallcap_tiny"
    cfg = json.loads((root / "config.json").read_text())
    golden = np.load(root / "golden.npz")
    vision = vision_from_state_dict(cfg["encoder"], load_state_dict(root), prefix="encoder.")
    tokens, _ = vision(_nhwc(golden["px"]))
    assert _max_err(tokens, golden["enc"]) <= TOL


def _fake_hub_cache(tmp_path, source, repo="org/name"):
    """The on-disk layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<sha>}."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    storage = tmp_path / ("models--" + repo.replace("/", "--"))
    shutil.copytree(source, storage / "snapshots" / sha,
                    ignore=shutil.ignore_patterns("golden.npz", "vision_only"))
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(sha)
    return tmp_path


def test_loads_hub_id_from_offline_cache(tmp_path, monkeypatch, fixtures_dir, golden):
    cache = _fake_hub_cache(tmp_path, fixtures_dir / "clip_tiny")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    vision, _, _ = load_clip("org/name")
    _, pooled = vision(_nhwc(golden["pixel_values"]))
    assert _max_err(pooled, golden["vision_pooler_output"]) <= TOL
    with pytest.raises(CheckpointError, match="could not be fetched"):
        load_clip("org/missing")


def test_missing_and_unexpected_tensors_are_errors(fixtures_dir):
    cfg = json.loads((fixtures_dir / "clip_tiny" / "config.json").read_text())
    sd = load_state_dict(fixtures_dir / "clip_tiny")
    no_norm = {k: v for k, v in sd.items() if k != "text_model.final_layer_norm.bias"}
    with pytest.raises(CheckpointError, match="final_layer_norm.bias"):
        text_from_state_dict(cfg, no_norm)
    extra = {**sd, "vision_model.encoder.layers.2.mlp.fc1.weight": np.zeros((37, 32))}
    with pytest.raises(CheckpointError, match="unexpected tensors.*layers.2"):
        vision_from_state_dict(cfg, extra)
    wrong = dict(sd)
    wrong["vision_model.embeddings.position_embedding.weight"] = np.zeros((16, 32), np.float32)
    with pytest.raises(CheckpointError, match="position_embedding.embedding has shape"):
        vision_from_state_dict(cfg, wrong)


def test_load_clip_rejects_a_vision_only_dir_and_stray_keys(fixtures_dir, tmp_path):
    with pytest.raises(CheckpointError, match="not a CLIPModel config"):
        load_clip(fixtures_dir / "clip_tiny" / "vision_only")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_clip(tmp_path / "nowhere")
