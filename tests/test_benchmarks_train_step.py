"""The train-step benchmark runs end to end at a toy size (its timings are not checked), its
FLOP count agrees with XLA's, and the gradient materialisation it motivated is an identity."""

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ravlm_jax.models.layers import materialize_grad

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_step.py"
GPU_SCRIPT = SCRIPT.with_name("gpu.sh")


def load_script():
    spec = importlib.util.spec_from_file_location("bench_train_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # compiles a train step: ~5 s on an idle core, ~20 s on a busy one
def test_benchmark_runs_and_writes_json(tmp_path):
    bench = load_script()
    out = tmp_path / "r.json"
    args = bench.parse_args(["--size", "tiny", "--skip-torch", "--warmup", "1", "--steps",
                             "1", "--rounds", "2", "--ceiling-n", "128", "--json", str(out)])
    bench.main(args)
    result = json.loads(out.read_text())
    for key in ("speedup_vs_torch", "ours_examples_per_sec", "torch_examples_per_sec",
                "ours_flops_per_sec", "matmul_ceiling_flops_per_sec", "fraction_of_ceiling",
                "config", "versions"):
        assert key in result, key
    assert result["speedup_vs_torch"] is None and result["torch_examples_per_sec"] is None
    assert result["torch_note"] == "skipped by --skip-torch"
    assert result["ours_examples_per_sec"] > 0 and result["matmul_ceiling_flops_per_sec"] > 0
    assert result["fraction_of_ceiling"] == pytest.approx(
        result["ours_flops_per_sec"] / result["matmul_ceiling_flops_per_sec"], rel=1.0)
    assert result["config"]["width"] == 64 and result["config"]["batch"] == 2
    assert len(result["fraction_of_ceiling_per_round"]) == 2


def test_size_overrides():
    bench = load_script()
    args = bench.parse_args(["--size", "small", "--batch", "4", "--vocab", "1000"])
    assert args.shape["batch"] == 4 and args.shape["vocab"] == 1000
    assert args.shape["width"] == bench.SIZES["small"]["width"]


@pytest.mark.slow
def test_analytic_flops_match_xla():
    """3 x forward matmul FLOPs against XLA's count of the compiled step, which adds the
    elementwise work (layer norms, softmax, AdamW) on top."""
    bench = load_script()
    shape = dict(bench.SIZES["tiny"], width=128, vocab=2048, seq_len=16, n_positions=16,
                 batch=4)
    pixels, ids = bench.make_batch(shape, 0)
    _, info = bench.build_ours(shape, "float32", 0, pixels, ids)
    ratio = bench.train_flops(shape) / info["xla_flops"]
    assert 0.75 < ratio < 1.05, ratio


def test_lr_schedule_matches_optax():
    import optax

    bench = load_script()
    sched = optax.warmup_cosine_decay_schedule(0.0, bench.LR, bench.WARMUP, bench.TOTAL_STEPS,
                                               0.0)
    for step in (0, 1, 50, 100, 101, 5000, 10_000):
        assert bench.lr_at(step) == pytest.approx(float(sched(step)), rel=1e-5, abs=1e-12)


def test_gpu_script_is_executable():
    assert GPU_SCRIPT.exists() and GPU_SCRIPT.stat().st_mode & 0o111


@pytest.mark.parametrize("value", [1.5, np.nan])
def test_materialize_grad_is_an_identity(value):
    x = jnp.array([[value, 2.0], [3.0, -4.0]])

    def f(x):
        return jnp.sum(jnp.sin(materialize_grad(x * x)))

    np.testing.assert_array_equal(materialize_grad(x), x)
    got = jax.jit(jax.grad(f))(x)
    want = jax.grad(lambda x: jnp.sum(jnp.sin(x * x)))(x)
    np.testing.assert_array_equal(got, want)
    assert jax.jit(jax.vmap(jax.grad(f)))(x[None]).shape == (1, 2, 2)
