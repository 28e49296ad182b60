"""The grain pipeline: static shapes, exact resume, disjoint covering shards, bad examples
skipped and counted, epochs, and a batch feeding a sharded jitted step."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ravlm_jax.data import pipeline, sources
from ravlm_jax.data.images import CLIP_MEAN, CLIP_STD, decode_image
from ravlm_jax.data.pipeline import TextField, make_loader
from ravlm_jax.data.sources import LocalSource

SIZE = 8


@pytest.fixture(scope="module")
def texts(bert):
    return {"caption": TextField(bert, 12)}


@pytest.fixture()
def local(tmp_path, write_jsonl):
    return LocalSource.from_jsonl(write_jsonl(tmp_path, 24), "all")


def loader(source, texts, **kwargs):
    defaults = {"batch_size": 4, "image_size": SIZE, "texts": texts, "shard_index": 0,
                "shard_count": 1, "num_threads": 2}
    return make_loader(source, **{**defaults, **kwargs})


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_openmoji_batch_shapes_and_dtypes(openmoji_subset, texts):
    source = sources.openmoji_source(openmoji_subset.data_dir, "train", image_size=32,
                                     limit=openmoji_subset.limit, build=False)
    batch = next(loader(source, texts, batch_size=6, image_size=32))
    assert batch["pixels"].shape == (6, 32, 32, 3) and batch["pixels"].dtype == np.float32
    for key in ("caption_ids", "caption_mask"):
        assert batch[key].shape == (6, 12) and batch[key].dtype == np.int32
    for key in ("group_id", "source_id", "caption_index", "valid"):
        assert batch[key].shape == (6,) and batch[key].dtype == np.int32
    assert batch["valid"].all() and (batch["caption_index"] == 0).all()
    # rows are the examples source_id points at, normalised for CLIP, captions tokenised
    i = int(batch["source_id"][0])
    ex = source[i]
    expected = (decode_image(ex["image"]) / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    np.testing.assert_allclose(batch["pixels"][0], expected, atol=1e-5)
    assert batch["group_id"][0] == ex["group_id"]
    ids, mask = texts["caption"].tokenizer.encode_batch([ex["captions"][0]], 12)
    np.testing.assert_array_equal(batch["caption_ids"][0], ids[0])
    np.testing.assert_array_equal(batch["caption_mask"][0], mask[0])


def test_state_restore_gives_identical_batches(tmp_path, write_jsonl, texts):
    source = LocalSource.from_jsonl(write_jsonl(tmp_path, 24, bad={5: "garbage"},
                                                empty_caption=(9,)), "all")
    kwargs = {"seed": 7, "caption_mode": "random_with_tags", "num_threads": 3}
    uninterrupted = loader(source, texts, **kwargs)
    first = take(uninterrupted, 5)
    state = json.loads(json.dumps(uninterrupted.get_state()))  # what a checkpoint stores
    rest = take(uninterrupted, 9)  # crosses into epochs 2 and 3
    resumed = loader(source, texts, **kwargs)
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 9), rest)
    assert resumed.skipped == uninterrupted.skipped
    skipped = uninterrupted.skipped  # 2 full epochs and part of a third were read
    assert skipped.keys() == {"bad_image", "empty_caption"} and min(skipped.values()) >= 2
    fresh = loader(source, texts, **kwargs)
    assert_batches_equal(take(fresh, 5), first)  # the seed alone fixes the stream


def test_shards_are_disjoint_and_cover_the_data(local, texts):
    n = len(local)
    for remainder, count in (("drop", 3), ("pad", 5)):
        seen = []
        for index in range(count):
            shard = loader(local, texts, num_epochs=1, remainder=remainder,
                           shard_index=index, shard_count=count, batch_size=2)
            batches = list(shard)
            ids = np.concatenate([b["source_id"][b["valid"] == 1] for b in batches])
            seen.append(set(ids.tolist()))
            assert len(ids) == len(set(ids.tolist()))
        lengths = {len(s) for s in seen}
        assert set().union(*seen) == set(range(n)), remainder
        assert sum(map(len, seen)) == n  # disjoint
        if remainder == "pad":
            assert max(lengths) - min(lengths) == 1  # 24 rows over 5 shards: padded rows


def test_padded_final_batch_and_equal_batch_counts(local, texts):
    counts = []
    for index in range(5):
        batches = list(loader(local, texts, num_epochs=1, remainder="pad", shard_index=index,
                              shard_count=5, batch_size=2, shuffle=False))
        counts.append(len(batches))
        last = batches[-1]
        assert last["pixels"].shape == (2, SIZE, SIZE, 3)
        padding = last["valid"] == 0
        assert (last["caption_mask"][padding] == 0).all()
        assert (last["source_id"][padding] == -1).all()
    assert len(set(counts)) == 1  # every process runs the same number of steps


def test_bad_images_and_empty_captions_are_skipped_and_counted(tmp_path, write_jsonl, texts):
    path = write_jsonl(tmp_path, 12, bad={1: "truncated", 4: "missing", 7: "garbage"},
                       empty_caption=(10,))
    source = LocalSource.from_jsonl(path, "all")
    ld = loader(source, texts, num_epochs=1, remainder="pad", batch_size=3, shuffle=False)
    batches = list(ld)
    ids = np.concatenate([b["source_id"][b["valid"] == 1] for b in batches]).tolist()
    assert sorted(ids) == [0, 2, 3, 5, 6, 8, 9, 11]
    assert ld.skipped == {"bad_image": 3, "empty_caption": 1}
    assert ld.get_state()["skipped"] == ld.skipped


def test_epochs_reshuffle_and_finite_streams_end(local, texts):
    batches = list(loader(local, texts, num_epochs=2, batch_size=4, seed=3))
    assert len(batches) == 2 * len(local) // 4
    order = np.concatenate([b["source_id"] for b in batches])
    first, second = order[: len(local)], order[len(local):]
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(len(local)))
    assert (first != second).any()
    unshuffled = np.concatenate([b["source_id"] for b in loader(
        local, texts, num_epochs=1, shuffle=False, batch_size=4)])
    assert unshuffled.tolist() == list(range(len(local)))


def test_uint8_pixels_and_several_text_fields(local, bert):
    texts = {"query": TextField(bert, 6), "target": TextField(bert, 10, append_eos=True)}
    batch = next(loader(local, texts, normalize=False))
    assert batch["pixels"].dtype == np.uint8
    assert batch["query_ids"].shape == (4, 6) and batch["target_ids"].shape == (4, 10)


def test_default_shard_is_this_jax_process(local, texts):
    ld = make_loader(local, batch_size=2, image_size=SIZE, texts=texts, num_threads=0)
    assert (ld.shard_index, ld.shard_count) == (jax.process_index(), jax.process_count())
    with pytest.raises(ValueError, match="shard_index"):
        make_loader(local, batch_size=2, image_size=SIZE, texts=texts, shard_index=0)
    with pytest.raises(ValueError, match="remainder"):
        loader(local, texts, remainder="keep")


def test_batch_feeds_a_sharded_jitted_step(local, texts, mesh8):
    batch = next(loader(local, texts, batch_size=8))
    sharding = NamedSharding(mesh8, P(("data", "fsdp")))
    pixels = jax.device_put(batch["pixels"], sharding)  # [B, H, W, 3] split over 4 devices
    ids = jax.device_put(batch["caption_ids"], sharding)

    @jax.jit
    def step(pixels, ids):
        return pixels.mean(axis=(1, 2, 3)) + (ids > 0).sum(-1)  # [B]

    out = step(pixels, ids)
    expected = batch["pixels"].mean(axis=(1, 2, 3)) + (batch["caption_ids"] > 0).sum(-1)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5)
    assert isinstance(out, jnp.ndarray)


def test_loader_from_config(openmoji_subset):
    config = {"kind": "openmoji", "data_dir": str(openmoji_subset.data_dir), "image_size": 32,
              "limit": openmoji_subset.limit, "tower": "clip",
              "texts": {"caption": {"tokenizer": "bert", "max_len": 8}}}
    source, ld = pipeline.loader_from_config(config, "validation", batch_size=4,
                                             shard_index=0, shard_count=1)
    batches = list(ld)
    assert sum(int(b["valid"].sum()) for b in batches) == len(source)
    assert batches[0]["caption_ids"].shape == (4, 8)


def test_index_loader_resume_and_shards():
    from ravlm_jax.data.pipeline import IndexLoader

    full = IndexLoader(10, batch_size=3, seed=1, shard_index=0, shard_count=1)
    first = [next(full)["source_id"] for _ in range(7)]
    # the first epoch is a permutation: its first 3 batches hold 9 distinct rows
    assert len(set(np.concatenate(first[:3]).tolist())) == 9
    again = IndexLoader(10, batch_size=3, seed=1, shard_index=0, shard_count=1)
    for _ in range(3):
        next(again)
    state = again.get_state()
    resumed = IndexLoader(10, batch_size=3, seed=1, shard_index=0, shard_count=1)
    resumed.set_state(state)
    for want in first[3:]:
        np.testing.assert_array_equal(next(resumed)["source_id"], want)
    a = IndexLoader(10, batch_size=1, seed=2, shard_index=0, shard_count=2)
    b = IndexLoader(10, batch_size=1, seed=2, shard_index=1, shard_count=2)
    rows = [int(next(a)["source_id"][0]) for _ in range(5)] + [
        int(next(b)["source_id"][0]) for _ in range(5)]
    assert sorted(rows) == list(range(10))
