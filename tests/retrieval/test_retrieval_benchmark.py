"""The benchmark script runs end to end at a toy size (its numbers are not checked here)."""

import importlib.util
import json
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "retrieval.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_retrieval", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_clustered_data_is_unit_and_clustered():
    bench = load_script()
    db, q = bench.clustered_unit_vectors(2000, 16, 50, centres=20, seed=0)
    assert db.shape == (2000, 16) and q.shape == (50, 16)
    np.testing.assert_allclose(np.linalg.norm(db, axis=1), 1, atol=1e-5)
    # a query's nearest neighbour is much closer than a random row
    s = q @ db.T
    assert s.max(1).mean() > s.mean() + 0.4


def test_benchmark_runs_and_writes_json(tmp_path):
    bench = load_script()
    out = tmp_path / "r.json"
    args = bench.parse_args(["--n", "3000", "--dim", "16", "--centres", "20", "--queries",
                             "64", "--single", "5", "--single-slow", "3",
                             "--skip", "faiss_hnsw,faiss_ivf", "--json", str(out)])
    bench.main(args)
    result = json.loads(out.read_text())
    rows = result["synthetic"]["backends"]
    assert set(rows) == {"exact_numpy", "scann", "exact"}
    assert rows["exact"]["recall_at_10"] == 1.0
    assert rows["scann"]["recall_at_10"] == 1.0  # 3000 rows: ScaNN brute force
    assert result["scann_vs_exact_numpy"] > 0


def test_benchmark_on_a_real_datastore(tmp_path):
    from ravlm_jax.retrieval.datastore import build_datastore

    bench = load_script()
    db, _ = bench.clustered_unit_vectors(600, 16, 1, centres=10, seed=1)
    batches = [{"emb": db[i:i + 100], "text": [f"c{j}" for j in range(i, i + 100)]}
               for i in range(0, 600, 100)]
    store = build_datastore(tmp_path / "store", lambda b: b["emb"], batches, fingerprint="f",
                            progress=False, index_kind="exact")
    args = bench.parse_args(["--n", "500", "--dim", "16", "--centres", "5", "--queries", "30",
                             "--single", "2", "--single-slow", "2", "--datastore", str(store),
                             "--skip", "faiss_hnsw,faiss_ivf,exact"])
    result = bench.main(args)
    assert result["datastore"]["n"] == 570  # 30 rows held out as queries
    assert result["datastore"]["backends"]["scann"]["recall_at_10"] >= 0.99
