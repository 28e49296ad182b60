import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ravlm_jax.models.layers import Linear
from ravlm_jax.retrieval import datastore as ds
from ravlm_jax.retrieval.datastore import (
    BuildSources,
    Datastore,
    DatastoreError,
    build_datastore,
    encoder_fingerprint,
    payload_hash,
    search_filtered,
    sharded_encode_fn,
)
from ravlm_jax.retrieval.index import ExactIndex, ScannIndex, make_index

REPO = Path(__file__).resolve().parents[2]
FEATURES, DIM = 12, 8


def unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


class FakeEncoder:
    """A deterministic stand-in for the dual encoder: random projection + normalisation."""

    def __init__(self, seed=0, dim=DIM):
        self.w = np.random.default_rng(seed).standard_normal((FEATURES, dim)).astype(np.float32)
        self.calls = 0

    def __call__(self, batch):
        self.calls += 1
        return unit(np.asarray(batch["features"]) @ self.w)


def make_rows(n=90, seed=0):
    """Rows as a captioning dataset has them: 3 captions per image (group), a few captions
    repeated verbatim across images, token ids of varying length."""
    rng = np.random.default_rng(seed)
    text = [f"caption {i % 40} of a thing" for i in range(n)]  # rows i and i+40 repeat
    lengths = rng.integers(2, 6, n)
    tokens = np.zeros((n, 6), np.int32)
    for i, L in enumerate(lengths):
        tokens[i, :L] = rng.integers(5, 100, L)
    return {"features": rng.standard_normal((n, FEATURES)).astype(np.float32),
            "text": text, "token_ids": tokens, "source_id": np.arange(n) + 1000,
            "group_id": np.arange(n) // 3, "image_ref": [f"img/{i // 3}.png" for i in range(n)]}


def batches_of(rows, size=8, stop_after=None):
    n = len(rows["text"])
    for b, start in enumerate(range(0, n, size)):
        if stop_after is not None and b == stop_after:
            raise KeyboardInterrupt("killed")
        yield {key: value[start:start + size] for key, value in rows.items()}


def build(out, rows, encoder=None, **kw):
    kw.setdefault("index_kind", "exact")
    kw.setdefault("progress", False)
    kw.setdefault("fingerprint", "fp-test")
    return build_datastore(out, encoder or FakeEncoder(), batches_of(rows), tokenizer_name="gpt2",
                           config_dict={"data": {"name": "toy"}}, **kw)


@pytest.fixture(scope="module")
def rows():
    return make_rows()


@pytest.fixture(scope="module")
def built(tmp_path_factory, rows):
    return build(tmp_path_factory.mktemp("ds") / "store", rows, shard_rows=20)


def test_build_writes_a_complete_datastore(built, rows):
    assert sorted(p.name for p in built.parent.iterdir()) == ["store"]  # no temp dirs left
    store = Datastore.load(built, expect_fingerprint="fp-test", expect_dim=DIM)
    m = store.manifest
    assert (m["count"], m["dim"], m["dtype"], m["schema_version"]) == (90, DIM, "float16", 1)
    assert m["encoder"] == {"fingerprint": "fp-test", "tokenizer": "gpt2"}
    assert m["build_config"] == {"data": {"name": "toy"}} and m["created"]
    assert "l2" in m["normalization"] and m["index"]["kind"] == "exact"
    assert not any(name.startswith("shards") for name in m["files"])
    assert isinstance(store.embeddings, np.memmap) and store.embeddings.dtype == np.float16
    np.testing.assert_allclose(store.embeddings, FakeEncoder()(rows), atol=1e-3)

    p = store.payload(np.array([[0, 41, -1]]))
    assert p["text"] == [["caption 0 of a thing", "caption 1 of a thing", ""]]
    np.testing.assert_array_equal(p["token_ids"][0, :2], rows["token_ids"][[0, 41]])
    assert (p["token_ids"][0, 2] == 0).all() and p["token_ids"].dtype == np.int32
    np.testing.assert_array_equal(p["source_id"], [[1000, 1041, -1]])
    np.testing.assert_array_equal(p["group_id"], [[0, 13, -1]])
    assert p["image_ref"] == [["img/0.png", "img/13.png", ""]]
    # duplicates share a payload hash, other rows do not
    assert store.hashes[0] == store.hashes[40] != store.hashes[1]
    with pytest.raises(ValueError, match="payload ids"):
        store.payload([90])


def test_exact_index_of_a_datastore_matches_numpy(built, rows):
    store = Datastore.load(built)
    q = FakeEncoder()(rows)[:4]
    _, ids = store.index.search(q, 3)
    emb = np.asarray(store.embeddings, np.float32)
    np.testing.assert_array_equal(ids, np.argsort(-(q @ emb.T), axis=1)[:, :3])
    assert ids[:, 0].tolist() == [0, 1, 2, 3]  # each row is its own nearest neighbour


def test_scann_datastore_saves_and_reloads_its_index(tmp_path, rows):
    out = build(tmp_path / "s", rows, index_kind="scann", dtype="float32")
    store = Datastore.load(out)
    assert store.manifest["index"] == {"kind": "scann", "params": {"mode": "brute_force"}}
    assert any(name.startswith("index/") for name in store.manifest["files"])
    assert isinstance(store.index, ScannIndex)
    q = FakeEncoder()(rows)[:5]
    exact = Datastore.load(out, index_kind="exact")
    assert isinstance(exact.index, ExactIndex)
    np.testing.assert_array_equal(store.index.search(q, 4)[1], exact.index.search(q, 4)[1])
    exact_only = build(tmp_path / "e", rows, index_kind="exact")
    with pytest.raises(DatastoreError, match="no saved ScaNN index"):
        _ = Datastore.load(exact_only, index_kind="scann").index


def test_killed_build_leaves_nothing_that_loads_and_resumes(tmp_path, rows):
    out = tmp_path / "store"
    enc = FakeEncoder()
    with pytest.raises(KeyboardInterrupt):
        build_datastore(out, enc, batches_of(rows, stop_after=7), fingerprint="fp",
                        progress=False, index_kind="exact", shard_rows=20)
    assert not out.exists()
    (tmp,) = tmp_path.glob("store.tmp-*")
    with pytest.raises(DatastoreError, match="no manifest.json"):
        Datastore.load(tmp)
    assert enc.calls == 7 and len(list((tmp / "shards").glob("shard_*"))) == 2  # 24 + 24 rows
    # the process that wrote it is gone: a new one adopts its complete shards
    os.replace(tmp, tmp_path / "store.tmp-999999999")
    enc2 = FakeEncoder()
    build_datastore(out, enc2, batches_of(rows), fingerprint="fp", progress=False,
                    index_kind="exact", shard_rows=20)
    assert enc2.calls == 12 - 6  # the 6 batches of the 2 complete shards are not re-encoded
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]
    resumed = Datastore.load(out)
    clean = Datastore.load(build(tmp_path / "clean", rows, fingerprint="fp", shard_rows=20))
    np.testing.assert_array_equal(resumed.embeddings, clean.embeddings)
    for key in ("token_ids", "source_ids", "group_ids", "hashes"):
        np.testing.assert_array_equal(getattr(resumed, key), getattr(clean, key))
    assert resumed.payload(np.arange(90))["text"] == rows["text"]


def test_a_build_with_other_inputs_does_not_resume(tmp_path, rows):
    out = tmp_path / "store"
    with pytest.raises(KeyboardInterrupt):
        build_datastore(out, FakeEncoder(), batches_of(rows, stop_after=5), fingerprint="a",
                        progress=False, index_kind="exact", shard_rows=8)
    (tmp,) = tmp_path.glob("store.tmp-*")
    os.replace(tmp, tmp_path / "store.tmp-999999999")
    enc = FakeEncoder(seed=1)
    build_datastore(out, enc, batches_of(rows), fingerprint="b", progress=False,
                    index_kind="exact")
    assert enc.calls == 12 and Datastore.load(out).fingerprint == "b"
    # the same process, killed, then rerun with other inputs: starts over as well
    with pytest.raises(KeyboardInterrupt):
        build_datastore(tmp_path / "again", FakeEncoder(), batches_of(rows, stop_after=5),
                        fingerprint="a", progress=False, index_kind="exact", shard_rows=8)
    enc = FakeEncoder(seed=2)
    build_datastore(tmp_path / "again", enc, batches_of(rows), fingerprint="c",
                    progress=False, index_kind="exact", shard_rows=8)
    assert enc.calls == 12
    np.testing.assert_allclose(Datastore.load(tmp_path / "again").embeddings, enc(rows),
                               atol=1e-3)


def test_existing_directory_needs_overwrite(tmp_path, rows):
    out = build(tmp_path / "s", rows)
    with pytest.raises(DatastoreError, match="already exists"):
        build(out, rows)
    build(out, rows, fingerprint="new", overwrite=True)
    assert Datastore.load(out).fingerprint == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_encoder_mismatch_is_one_line_naming_both_fingerprints(built):
    with pytest.raises(DatastoreError) as e:
        Datastore.load(built, expect_fingerprint="0123abcd")
    msg = str(e.value)
    assert "fp-test" in msg and "0123abcd" in msg and "\n" not in msg
    with pytest.raises(DatastoreError, match=r"dim 8 .* dim 16") as e:
        Datastore.load(built, expect_dim=16)
    assert "fp-test" in str(e.value)


@pytest.fixture
def copy_of(built, tmp_path):
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(built, target)
    return target


@pytest.mark.parametrize("damage, match", [
    (lambda d: (d / "embeddings.npy").write_bytes((d / "embeddings.npy").read_bytes()[:-64]),
     r"embeddings.npy is truncated"),
    (lambda d: (d / "payload" / "text.bin").unlink(), r"text.bin is missing"),
    (lambda d: (d / "manifest.json").write_text('{"count": 3,'), r"manifest.json is corrupted"),
    (lambda d: (d / "manifest.json").write_text('{"count": 3}'), r"corrupted \(needs fields"),
    (lambda d: (d / "manifest.json").unlink(), r"no manifest.json"),
])
def test_damaged_datastore_is_a_one_line_error(copy_of, damage, match):
    damage(copy_of)
    with pytest.raises(DatastoreError, match=match) as e:
        Datastore.load(copy_of)
    assert "\n" not in str(e.value)


def test_rewritten_array_with_the_same_size_is_caught_by_its_header(copy_of):
    np.save(copy_of / "payload" / "group_id.npy", np.zeros(90, np.uint64))  # same byte size
    with pytest.raises(DatastoreError, match="dtype uint64"):
        Datastore.load(copy_of)


def reference_filter(scores, ids, k, q_group, q_source, p_group, p_source, hashes):
    """Row by row, the obvious way."""
    out = []
    for r in range(ids.shape[0]):
        kept, seen = [], set()
        for i in ids[r]:
            if i < 0 or p_group[i] == q_group[r] or p_source[i] == q_source[r]:
                continue
            if hashes[i] in seen:
                continue
            seen.add(hashes[i])
            kept.append(int(i))
        out.append((kept + [-1] * k)[:k])
    return np.array(out)


def test_leakage_filter_matches_a_row_by_row_reference():
    rng = np.random.default_rng(0)
    n, d, b, k = 400, 16, 30, 5
    db = unit(rng.standard_normal((n, d)))
    groups = rng.integers(0, 60, n)
    sources = rng.integers(0, 200, n)
    hashes = rng.integers(0, 150, n).astype(np.uint64)  # many duplicate payloads
    rows = rng.choice(n, b, replace=False)
    q = db[rows]  # queries from the datastore itself: their own row must go
    index = make_index("exact", db)
    scores, ids = search_filtered(index, q, k, groups[rows], sources[rows], groups, sources,
                                  hashes, overfetch=4)
    _, all_ids = index.search(q, n)
    np.testing.assert_array_equal(ids, reference_filter(None, all_ids, k, groups[rows],
                                                        sources[rows], groups, sources,
                                                        hashes))
    assert not (ids == rows[:, None]).any()  # no query finds itself
    ref_scores = np.take_along_axis(q @ db.T, ids, 1)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)


def test_leakage_filter_refetches_then_pads():
    # 20 rows in 2 groups; a query from group 0 with k=15 can only get group 1's 10 rows
    db = unit(np.random.default_rng(1).standard_normal((20, 4)))
    groups = np.repeat([0, 1], 10)
    index = make_index("exact", db)
    scores, ids = search_filtered(index, db[:2], 15, np.array([0, 1]), None, groups, None,
                                  None, overfetch=1)
    assert set(ids[0, :10].tolist()) == set(range(10, 20))
    assert set(ids[1, :10].tolist()) == set(range(10))
    assert (ids[:, 10:] == -1).all() and np.isneginf(scores[:, 10:]).all()
    # k=3 with overfetch 1: the first pass finds too few, the refetch fills the rows
    _, ids = search_filtered(index, db[:1], 3, np.array([0]), None, groups, None, None,
                             overfetch=1)
    assert (ids >= 10).all()
    # no filters: plain search
    np.testing.assert_array_equal(search_filtered(index, db[:3], 4)[1],
                                  index.search(db[:3], 4)[1])


def test_datastore_search_drops_own_group_and_duplicates(built, rows):
    store = Datastore.load(built)
    q = np.asarray(store.embeddings[:6], np.float32)
    q = unit(q)
    _, ids = store.search(q, 5, query_group_ids=rows["group_id"][:6],
                          query_source_ids=rows["source_id"][:6])
    p = store.payload(ids)
    for r in range(6):
        assert (p["group_id"][r] != rows["group_id"][r]).all()
        assert len(set(map(ds.normalise_text, p["text"][r]))) == 5


def test_encoder_fingerprint_tracks_weights_and_config():
    model = Linear(4, 3, rngs=nnx.Rngs(0))
    fp = encoder_fingerprint(model, {"dim": 3})
    assert len(fp) == 16 and fp == encoder_fingerprint(nnx.state(model), {"dim": 3})
    assert fp == encoder_fingerprint(Linear(4, 3, rngs=nnx.Rngs(0)), {"dim": 3})
    assert fp != encoder_fingerprint(Linear(4, 3, rngs=nnx.Rngs(1)), {"dim": 3})
    assert fp != encoder_fingerprint(model, {"dim": 4})
    import ml_collections

    assert encoder_fingerprint(model, ml_collections.ConfigDict({"dim": 3})) == fp
    assert encoder_fingerprint({"w": np.ones(3, np.float32)}, None) != encoder_fingerprint(
        {"w": np.ones(3, np.float64)}, None)


def test_payload_hash_normalises_text_and_trims_padding():
    assert payload_hash(["A  cat", "a cat ", "a dog"]).tolist()[:2] == \
        payload_hash(["a cat", "a cat"]).tolist()
    t = payload_hash(token_ids=np.array([[5, 6, 0, 0], [5, 6, 0, 7], [5, 6, 0, 0]]))
    assert t[0] == t[2] != t[1]


def test_sharded_encode_fn_pads_the_batch_to_the_mesh(mesh8):
    w = jnp.asarray(FakeEncoder().w)
    encode = sharded_encode_fn(lambda x: x @ w / jnp.linalg.norm(x @ w, axis=-1,
                                                                  keepdims=True),
                               mesh8, ["features"])
    feats = make_rows(13)["features"]
    out = encode({"features": feats})
    assert out.shape == (13, DIM)
    np.testing.assert_allclose(out, FakeEncoder()({"features": feats}), atol=1e-5)


# ----------------------------------------------------------------------------- CLI


def fake_sources(rows):
    return lambda config, encoder, **_: BuildSources(FakeEncoder(), list(batches_of(rows)),
                                                fingerprint=f"fake-{encoder}",
                                                tokenizer_name="gpt2")


def test_cli_build_and_info(tmp_path, rows, capsys):
    cfg = tmp_path / "cfg.py"
    cfg.write_text("import ml_collections\n"
                   "def get_config():\n"
                   "    c = ml_collections.ConfigDict()\n"
                   "    c.retrieval = ml_collections.ConfigDict({'datastore': ''})\n"
                   "    c.data = ml_collections.ConfigDict({'name': 'toy'})\n"
                   "    return c\n")
    out = tmp_path / "store"
    code = ds.main(["build", "--config", str(cfg), "--encoder", "ckpt", "--index", "exact",
                    "--quiet", f"retrieval.datastore={out}"], build_sources=fake_sources(rows))
    assert code == 0
    assert "built" in capsys.readouterr().out
    store = Datastore.load(out, expect_fingerprint="fake-ckpt")
    assert store.manifest["build_config"]["retrieval"]["datastore"] == str(out)
    assert ds.main(["info", str(out), "--expect-fingerprint", "fake-ckpt"]) == 0
    assert "90 rows" in capsys.readouterr().out
    # bad input: one line on stderr, status 2
    assert ds.main(["info", str(out), "--expect-fingerprint", "other"]) == 2
    assert ds.main(["build", "--config", str(tmp_path / "nope.py"), "--encoder", "x"],
                   build_sources=fake_sources(rows)) == 2
    assert ds.main(["build", "--config", str(cfg), "--encoder", "x"]) == 2  # not wired yet
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)
    assert "fake-ckpt" in err[0] and "other" in err[0]


def test_cli_bad_input_never_prints_a_traceback(tmp_path, copy_of, capsys):
    manifest = copy_of / "manifest.json"
    manifest.write_text(manifest.read_text()[:40])
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", "ravlm_jax.retrieval.datastore", "info",
                        str(copy_of)], capture_output=True, text=True, cwd=REPO, env=env,
                       timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ")
    assert "manifest.json is corrupted" in r.stderr
    assert ds.main(["info", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("error: datastore")


def test_fake_encoder_outputs_are_checked(tmp_path, rows):
    bad = lambda batch: np.asarray(batch["features"])[:, :DIM]  # not normalised
    with pytest.raises(ValueError, match="encoder outputs are not unit vectors"):
        build_datastore(tmp_path / "x", bad, batches_of(rows), fingerprint="f", progress=False)
    assert not (tmp_path / "x").exists()
