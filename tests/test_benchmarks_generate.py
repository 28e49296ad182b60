"""The generation benchmark runs end to end at a toy size without torch (its timings are not
checked), counts one host search per chunk for the ScaNN contender, and refuses a GPU run
where JAX sees none."""

import importlib.util
import json
from pathlib import Path

import jax
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "generate.py"
TINY = ["--batches", "2", "--new-tokens", "8", "--chunk", "4", "--repeats", "2", "--rows",
        "500", "--vocab", "1536", "--width", "32", "--layers", "1", "--heads", "2",
        "--image-tokens", "4", "--neighbour-len", "6"]


def load_script():
    spec = importlib.util.spec_from_file_location("bench_generate", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # builds a ScaNN index and compiles two generators: ~10 s
def test_benchmark_runs_ours_only_and_writes_json(tmp_path):
    bench = load_script()
    out = tmp_path / "g.json"
    result = bench.cli([*TINY, "--skip-torch", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))  # what it wrote
    row = result["batch_2"]
    assert set(row) == {"ours_scann", "ours_exact", "chunks"}
    assert row["chunks"] == 2 and result["speedup_b2"] is None
    assert result["torch_note"] == "skipped by --skip-torch" and result["device"] == "cpu"
    for name in ("ours_scann", "ours_exact"):
        assert row[name]["tokens_per_s"] == pytest.approx(16 / row[name]["seconds"], rel=0.01)
        assert len(row[name]["runs_s"]) == 2
    # the ScaNN contender searches on the host once per chunk; the exact one in-graph
    assert row["ours_scann"]["retrieval_calls_per_run"] == 2
    assert "retrieval_calls_per_run" not in row["ours_exact"]
    assert result["neighbour_tables"]["kept"] is True


def test_gpu_run_refused_without_a_gpu():
    if jax.default_backend() == "gpu":
        pytest.skip("this machine has a GPU")
    bench = load_script()
    with pytest.raises(SystemExit, match="--device gpu, but JAX's backend is cpu"):
        bench.main(bench.parse_args(["--device", "gpu", "--skip-torch"]))


def test_torch_skip_note():
    bench = load_script()
    assert bench.torch_skip_note(True, "cpu") == "skipped by --skip-torch"
