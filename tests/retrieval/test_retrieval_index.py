import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ravlm_jax.retrieval.index import (
    BRUTE_FORCE_BELOW,
    ExactIndex,
    ScannIndex,
    default_scann_params,
    exact_search,
    load_index,
    make_index,
)


def unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def random_unit(n, d, seed):
    return unit(np.random.default_rng(seed).standard_normal((n, d)))


def clustered(n, d, queries, centres, seed=0, spread=0.7):
    """A small Gaussian mixture of unit vectors (log-normal cluster sizes), like the
    benchmark's, with held-out queries from the same mixture."""
    rng = np.random.default_rng(seed)
    c = unit(rng.standard_normal((centres, d)))
    w = rng.lognormal(0, 1, centres)
    w /= w.sum()

    def draw(m):
        which = rng.choice(centres, m, p=w)
        return unit(c[which] + spread * rng.standard_normal((m, d)) / np.sqrt(d))

    return draw(n), draw(queries)


def numpy_top_k(db, q, k):
    s = q @ db.T
    ids = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, ids, 1), ids


def recall(found, truth):
    return np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)])


def test_exact_matches_numpy_brute_force():
    db, q = random_unit(1000, 32, 0), random_unit(7, 32, 1)
    index = make_index("exact", db)
    scores, ids = index.search(q, 10)
    ref_scores, ref_ids = numpy_top_k(db, q, 10)
    assert scores.dtype == np.float32 and ids.dtype == np.int32 and ids.shape == (7, 10)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)


def test_sharded_exact_on_8_devices_equals_unsharded(mesh8):
    db, q = random_unit(1003, 16, 2), random_unit(5, 16, 3)  # 1003 rows: padded to 1008
    sharded = ExactIndex.build(db, mesh8)
    assert sharded.table.shape == (1008, 16)
    assert sharded.table.sharding.spec == P(("data", "fsdp", "model"))
    assert len(sharded.table.addressable_shards) == 8
    plain = ExactIndex.build(db)
    for k in (1, 10, 200):  # 200 > 126 rows per shard: every shard returns all it has
        s1, i1 = sharded.search(q, k)
        s2, i2 = plain.search(q, k)
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_allclose(s1, s2, atol=1e-6)
        np.testing.assert_array_equal(i1, numpy_top_k(db, q, k)[1])


def test_bfloat16_table_keeps_the_nearest_neighbours(mesh8):
    db, q = random_unit(512, 32, 14), random_unit(6, 32, 15)
    index = ExactIndex.build(db, mesh8, dtype="bfloat16")
    assert index.table.dtype == jnp.bfloat16
    scores, ids = index.search(q, 3)
    np.testing.assert_array_equal(ids[:, 0], numpy_top_k(db, q, 1)[1][:, 0])
    np.testing.assert_allclose(scores, numpy_top_k(db, q, 3)[0], atol=2e-2)


def test_exact_search_in_graph_with_traced_valid_count(mesh8):
    """Generation calls exact_search inside its own jit: valid_count is a traced value, so
    a datastore that grows inside a preallocated table needs no recompilation."""
    table_np = random_unit(64, 8, 4)
    table = jax.device_put(table_np, jax.sharding.NamedSharding(mesh8, P(("data", "fsdp",
                                                                         "model"))))
    q = random_unit(3, 8, 5)

    @jax.jit
    def step(queries, valid):
        scores, ids = exact_search(queries * 2.0, table, valid, 4, mesh8)
        return scores / 2.0, ids

    for valid in (64, 20, 3):
        scores, ids = step(q, jnp.int32(valid))
        ref_scores, ref_ids = numpy_top_k(table_np[:valid], q, min(4, valid))
        np.testing.assert_array_equal(np.asarray(ids)[:, :ref_ids.shape[1]], ref_ids)
        np.testing.assert_allclose(np.asarray(scores)[:, :ref_ids.shape[1]], ref_scores,
                                   atol=1e-6)
        if valid < 4:
            assert (np.asarray(ids)[:, valid:] == -1).all()
            assert np.isneginf(np.asarray(scores)[:, valid:]).all()


@pytest.mark.parametrize("kind", ["exact", "scann"])
def test_k_larger_than_datastore_pads(kind):
    db, q = random_unit(12, 8, 6), random_unit(2, 8, 7)
    index = make_index(kind, db)
    with pytest.warns(UserWarning, match="exceeds the datastore size 12"):
        scores, ids = index.search(q, 20)
    assert ids.shape == (2, 20) and scores.shape == (2, 20)
    assert sorted(ids[0, :12].tolist()) == list(range(12))
    assert (ids[:, 12:] == -1).all() and np.isneginf(scores[:, 12:]).all()
    np.testing.assert_array_equal(ids[:, :12], numpy_top_k(db, q, 12)[1])
    # a single query takes the same path
    with pytest.warns(UserWarning):
        _, one = index.search(q[:1], 13)
    assert one.shape == (1, 13) and one[0, 12] == -1


def test_scann_defaults_depend_on_size():
    assert default_scann_params(500)["mode"] == "brute_force"
    big = default_scann_params(1_000_000)
    assert big["mode"] == "tree_ah" and big["num_leaves"] == 2000
    assert 1 <= big["leaves_to_search"] <= big["num_leaves"]
    assert big["dims_per_block"] == 2 and big["anisotropic_quantization_threshold"] == 0.2
    # small datastores search enough leaves to score ~1,000 rows; 100k keeps its 8
    small = default_scann_params(20_000)
    assert small["leaves_to_search"] * 20_000 / small["num_leaves"] >= 1_000
    assert default_scann_params(100_000)["leaves_to_search"] == 8


def test_scann_tiny_datastore_is_brute_force_and_exact():
    db, q = random_unit(BRUTE_FORCE_BELOW // 20, 16, 8), random_unit(4, 16, 9)
    index = make_index("scann", db)
    assert index.params["mode"] == "brute_force"
    scores, ids = index.search(q, 5)
    ref_scores, ref_ids = numpy_top_k(db, q, 5)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)


@pytest.fixture(scope="module")
def clustered_20k():
    db, q = clustered(20_000, 64, 200, centres=200)
    return db, q, numpy_top_k(db, q, 10)[1]


@pytest.fixture(scope="module")
def scann_20k(clustered_20k):
    return ScannIndex.build(clustered_20k[0], num_threads=2)


def test_scann_recall_on_clustered_20k(clustered_20k, scann_20k):
    db, q, truth = clustered_20k
    assert scann_20k.params["mode"] == "tree_ah"
    _, ids = scann_20k.search(q, 10)
    assert recall(ids, truth) >= 0.95
    _, one = scann_20k.search(q[:1], 10)  # the single-query path agrees with the batch
    np.testing.assert_array_equal(one[0], ids[0])


def test_scann_save_load_identical(tmp_path, clustered_20k, scann_20k):
    _, q, _ = clustered_20k
    scann_20k.save(tmp_path / "idx")
    loaded = load_index(tmp_path / "idx")
    assert isinstance(loaded, ScannIndex) and loaded.params == scann_20k.params
    assert (loaded.size, loaded.dim) == (20_000, 64)
    for a, b in zip(scann_20k.search(q, 10), loaded.search(q, 10), strict=True):
        np.testing.assert_array_equal(a, b)


def test_exact_save_load_identical(tmp_path):
    db, q = random_unit(300, 8, 10), random_unit(3, 8, 11)
    index = make_index("exact", db)
    index.save(tmp_path / "exact")
    loaded = load_index(tmp_path / "exact")
    assert isinstance(loaded, ExactIndex) and loaded.size == 300
    for a, b in zip(index.search(q, 7), loaded.search(q, 7), strict=True):
        np.testing.assert_array_equal(a, b)


def test_truncated_or_corrupted_index_is_a_one_line_error(tmp_path):
    db = random_unit(300, 8, 12)
    make_index("scann", db).save(tmp_path / "s")
    target = tmp_path / "s" / "dataset.npy"
    target.write_bytes(target.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"dataset.npy is truncated") as e:
        load_index(tmp_path / "s")
    assert "\n" not in str(e.value)
    (tmp_path / "s" / "index.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupted"):
        load_index(tmp_path / "s")
    with pytest.raises(ValueError, match="not a saved index"):
        load_index(tmp_path / "missing")


def test_bad_inputs_are_rejected():
    db = random_unit(50, 8, 13)
    with pytest.raises(ValueError, match="not unit vectors"):
        make_index("exact", db * 2)
    with pytest.raises(ValueError, match="unknown index kind"):
        make_index("faiss", db)
    with pytest.raises(ValueError, match="unknown ScaNN parameters"):
        make_index("scann", db, leaves=3)
    index = make_index("exact", db)
    with pytest.raises(ValueError, match=r"shape \[B, 8\]"):
        index.search(np.zeros((2, 9), np.float32), 3)
    with pytest.raises(ValueError, match="positive integer"):
        index.search(db[:1], 0)
    for kind in ("exact", "scann"):  # an empty batch is not an error
        scores, ids = make_index(kind, db).search(np.zeros((0, 8), np.float32), 3)
        assert scores.shape == ids.shape == (0, 3)


def test_scann_overrides_are_recorded(tmp_path):
    db, q = clustered(12_000, 16, 20, centres=50, seed=1)
    index = make_index("scann", db, num_leaves=40, leaves_to_search=400, reorder=2000)
    assert index.params["num_leaves"] == 40
    assert index.params["leaves_to_search"] == 40  # clamped to the number of leaves
    index.save(tmp_path)
    assert json.loads((tmp_path / "index.json").read_text())["params"]["reorder"] == 2000
    # every leaf searched and a deep re-order: exact on this small set
    np.testing.assert_array_equal(index.search(q, 5)[1], numpy_top_k(db, q, 5)[1])
