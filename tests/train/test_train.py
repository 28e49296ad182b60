"""End-to-end training on the tiny config: one run, sharded == unsharded, kill -9 and
resume == uninterrupted, the NaN guard, config overrides."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ravlm_jax.config import apply_overrides, load_config

ROOT = Path(__file__).resolve().parents[2]
TIMING = ("examples_per_sec",)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("openmoji"))


def tiny(data_dir, *overrides):
    config = load_config(str(ROOT / "configs" / "tiny.py"))
    return apply_overrides(config, [f"data.data_dir={data_dir}", "eval.enabled=false",
                                    "train.progress=false", *overrides])


def metrics(workdir):
    rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text()
            .splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def test_config_overrides():
    config = load_config(str(ROOT / "configs" / "tiny.py"))
    out = apply_overrides(config, ["train.caption.steps=9", "retrieval.index=exact",
                                   "mesh.shape=[2,2,2]", "train.progress=false",
                                   "model.freeze=[\"a\"]"])
    assert out.train.caption.steps == 9 and out.retrieval.index == "exact"
    assert tuple(out.mesh.shape) == (2, 2, 2) and out.train.progress is False
    assert tuple(out.model.freeze) == ("a",)
    with pytest.raises(KeyError, match="unknown config key"):
        apply_overrides(config, ["train.nope=1"])
    with pytest.raises(ValueError, match="not KEY=VALUE"):
        apply_overrides(config, ["train.caption.steps"])
    with pytest.raises(ValueError):
        apply_overrides(config, ["train.caption.steps=many"])


@pytest.mark.slow
def test_one_run_all_stages(tmp_path, data_dir):
    from ravlm_jax.retrieval.datastore import Datastore
    from ravlm_jax.train.export import load_model
    from ravlm_jax.train.loop import train_and_evaluate

    config = tiny(data_dir, "train.contrastive.steps=2", "train.caption.steps=2")
    train_and_evaluate(config, tmp_path)
    rows = metrics(tmp_path)
    assert [(r["stage"], r["step"]) for r in rows] == [
        ("contrastive", 1), ("contrastive", 2), ("caption", 1), ("caption", 2)]
    for r in rows:
        assert {"loss", "learning_rate", "grad_norm"} <= set(r) and np.isfinite(r["loss"])
    assert Datastore.load(tmp_path / "datastore").size > 0
    model, cfg = load_model(tmp_path)
    assert cfg.model.decoder.width == 32
    for name in ("config.json", "run_info.json", "curves.png", "compile_caption.json"):
        assert (tmp_path / name).is_file(), name
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert "jax" in info["versions"] and info["git_commit"]
    assert list((tmp_path / "tensorboard" / "caption").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_bfloat16_compute_trains_and_keeps_float32_parameters(tmp_path, data_dir):
    """``model.dtype=bfloat16``: every stage runs with bf16 matmuls (float32 accumulation
    and parameters), the loss falls, and the exported model computes in bf16."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from ravlm_jax.train.export import load_model
    from ravlm_jax.train.loop import train_and_evaluate

    config = tiny(data_dir, "model.dtype=bfloat16", "train.contrastive.steps=2",
                  "train.caption.steps=6", "train.log_every=1")
    train_and_evaluate(config, tmp_path)
    caption = [r["loss"] for r in metrics(tmp_path) if r["stage"] == "caption"]
    assert len(caption) == 6 and np.all(np.isfinite(caption)) and caption[-1] < caption[0]
    model, cfg = load_model(tmp_path)
    assert cfg.model.dtype == "bfloat16" and model.decoder.cfg.dtype == "bfloat16"
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert params and all(p.dtype == jnp.float32 for p in params)
    with pytest.raises(ValueError, match="model.dtype must be one of"):
        train_and_evaluate(tiny(data_dir, "model.dtype=float16"), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()  # refused before the workdir is written


@pytest.mark.slow
def test_sharded_equals_single_device(tmp_path, data_dir):
    from ravlm_jax.train.loop import train_and_evaluate

    runs = {}
    for shape in ("[1,1,1]", "[2,2,2]"):
        config = tiny(data_dir, f"mesh.shape={shape}", "train.stages=[\"contrastive\"]",
                      "train.contrastive.steps=5")
        train_and_evaluate(config, tmp_path / shape)
        runs[shape] = [r["loss"] for r in metrics(tmp_path / shape)]
    assert len(runs["[1,1,1]"]) == 5
    np.testing.assert_allclose(runs["[2,2,2]"], runs["[1,1,1]"], atol=1e-5, rtol=0)


def _train_cmd(workdir, data_dir):
    return [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs/tiny.py"),
            "--workdir", str(workdir), f"--config.data.data_dir={data_dir}",
            "--config.eval.enabled=false", "--config.train.progress=false"]


def _kill_when(cmd, predicate, timeout=240):
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            cwd=ROOT, start_new_session=True)
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < timeout:
        if predicate():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.05)
    proc.wait()
    return False


@pytest.mark.slow
def test_sigkill_and_resume_equals_uninterrupted(tmp_path, data_dir):
    ref = tmp_path / "ref"
    subprocess.run(_train_cmd(ref, data_dir), check=True, cwd=ROOT, capture_output=True)
    work = tmp_path / "killed"
    mfile = work / "metrics.jsonl"

    def logged(stage, step):
        def pred():
            return mfile.exists() and f'"stage": "{stage}", "step": {step},' in mfile.read_text()
        return pred

    # killed mid-contrastive (after step 3 was logged), then mid-caption
    assert _kill_when(_train_cmd(work, data_dir), logged("contrastive", 3))
    assert _kill_when(_train_cmd(work, data_dir), logged("caption", 3))
    done = subprocess.run(_train_cmd(work, data_dir), cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from step" in done.stdout
    got, want = metrics(work), metrics(ref)
    assert [(r["stage"], r["step"]) for r in got] == [(r["stage"], r["step"]) for r in want]
    for g, w in zip(got, want, strict=True):
        for key in w:
            if isinstance(w[key], float):
                assert g[key] == pytest.approx(w[key], abs=1e-6), (g["stage"], g["step"], key)


@pytest.mark.slow
def test_nan_guard_stops_with_step(tmp_path, data_dir):
    cmd = _train_cmd(tmp_path, data_dir) + ["--config.train.contrastive.learning_rate=1e30",
                                            "--config.train.contrastive.grad_clip=1e30",
                                            "--config.train.stages=[\"contrastive\"]"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("train.py: error: contrastive:") and "at step" in last, last
    assert "Traceback" not in proc.stderr


def test_lm_loss_weight_without_copy_head_is_refused_before_training(tmp_path, data_dir):
    from ravlm_jax.train.loop import train_and_evaluate

    config = tiny(data_dir, "train.caption.lm_loss_weight=0.3",
                  "model.captioner.copy_head=false")
    with pytest.raises(ValueError, match="needs model.captioner.copy_head"):
        train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_folds_keep_groups_together():
    from ravlm_jax.train.loop import fold_of_rows

    groups = np.array([5, 5, 7, 9, 9, 9, 11, 12, 12, 13])
    fold = fold_of_rows(groups, 2, seed=0)
    for g in np.unique(groups):
        assert len(set(fold[groups == g])) == 1
    assert set(fold) == {0, 1}
    np.testing.assert_array_equal(fold, fold_of_rows(groups, 2, seed=0))
