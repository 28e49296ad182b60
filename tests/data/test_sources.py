"""Sources: JSONL, image folder, TFDS by name (a locally built dataset) and OpenMoji all yield
the same example structure."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow_datasets as tfds

from ravlm_jax.data import sources
from ravlm_jax.data.sources import LocalSource, TfdsSource, open_source

EXAMPLE_KEYS = {"image", "captions", "tags", "source_id", "group_id", "image_path"}


def assert_example(ex):
    assert set(ex) == EXAMPLE_KEYS
    assert isinstance(ex["image"], (bytes, str, np.ndarray))
    assert isinstance(ex["captions"], list) and all(isinstance(c, str) for c in ex["captions"])
    assert isinstance(ex["tags"], list) and all(isinstance(t, str) for t in ex["tags"])
    assert isinstance(ex["source_id"], (str, int))
    assert isinstance(ex["group_id"], int) and 0 <= ex["group_id"] < 2**31
    assert isinstance(ex["image_path"], str)


class CaptionsLikeCoco(tfds.core.GeneratorBasedBuilder):
    """A tiny dataset shaped like coco_captions: captions/text inside a sequence of dicts."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "image/id": np.int64,
            "captions": tfds.features.Sequence({"id": np.int64,
                                                "text": tfds.features.Text()}),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(range(6)),
                "validation": self._generate_examples(range(6, 8))}

    def _generate_examples(self, ids):
        from PIL import Image

        for i in ids:
            pixels = np.full((4 + i, 5, 3), i * 20, np.uint8)
            yield i, {"image": Image.fromarray(pixels), "image/id": 1000 + i,
                      "captions": {"id": [2 * i, 2 * i + 1],
                                   "text": [f"picture {i}", f"image number {i}"]}}


@pytest.fixture(scope="module")
def coco_like_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds_coco_like")
    builder = CaptionsLikeCoco(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        compute_stats=tfds.download.ComputeStatsMode.SKIP))
    return data_dir


def test_tfds_by_name_with_nested_feature_keys(coco_like_dir):
    config = {"kind": "tfds", "name": "captions_like_coco", "data_dir": str(coco_like_dir),
              "captions_key": "captions/text", "id_key": "image/id"}
    train = open_source(config, "train")
    assert isinstance(train, TfdsSource) and len(train) == 6
    examples = [train[i] for i in range(len(train))]
    for ex in examples:
        assert_example(ex)
        assert ex["image"][:4] == b"\x89PNG"  # not decoded: the pipeline decodes safely
        i = ex["source_id"] - 1000
        assert ex["captions"] == [f"picture {i}", f"image number {i}"]
        assert ex["group_id"] == ex["source_id"]  # group defaults to the id
    assert sorted(ex["source_id"] for ex in examples) == list(range(1000, 1006))
    assert train.__getitems__([0, 1])[1] == examples[1]
    assert len(open_source(config, "validation")) == 2


def test_tfds_missing_dataset_is_a_clear_error(tmp_path, coco_like_dir):
    with pytest.raises(ValueError, match="not available.*tfds build captions_like_coco"):
        TfdsSource("captions_like_coco", "train", tmp_path)
    with pytest.raises(ValueError, match="unknown TFDS dataset"):
        TfdsSource("no_such_dataset_anywhere", "train", tmp_path)
    with pytest.raises(ValueError, match="split"):
        TfdsSource("captions_like_coco", "test", coco_like_dir)


def test_openmoji_by_name_from_files(openmoji_subset):
    """The subset's config is not registered in code: TFDS reads it from the files."""
    name = f"openmoji/{openmoji_subset.builder.builder_config.name}"
    by_name = TfdsSource(name, "test", openmoji_subset.data_dir, id_key="source_id",
                         group_key="group_id", tags_key="tags")
    ours = sources.openmoji_source(openmoji_subset.data_dir, "test", image_size=32,
                                   limit=openmoji_subset.limit, build=False)
    assert len(by_name) == len(ours) > 0
    a, b = by_name[0], ours[0]
    assert_example(a)
    assert a == b and a["source_id"].startswith(("1F", "2", "E")) and a["captions"][0]
    assert ours.references(0) == [t for t in a["captions"] + a["tags"]]


def test_jsonl_records_paths_and_splits(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path, 20)
    everything = LocalSource.from_jsonl(path, "all")
    assert len(everything) == 20
    ex = everything[3]
    assert_example(ex)
    assert ex["image"] == str(tmp_path / "images" / "img003.png") == ex["image_path"]
    assert ex["captions"] == ["caption 3", "another caption 3"] and ex["tags"] == ["tag3"]
    assert ex["source_id"] == "r3"
    splits = {s: LocalSource.from_jsonl(path, s, seed=1) for s in ("train", "validation",
                                                                     "test")}
    ids = [set(src[i]["source_id"] for i in range(len(src))) for src in splits.values()]
    assert sum(map(len, ids)) == 20 and not (ids[0] & ids[1] or ids[0] & ids[2])
    again = LocalSource.from_jsonl(path, "test", seed=1)
    assert [again[i] for i in range(len(again))] == [splits["test"][i]
                                                       for i in range(len(again))]


def test_jsonl_split_field_and_groups(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path, 10, split_field=True)
    test = LocalSource.from_jsonl(path, "test")
    assert [test[i]["source_id"] for i in range(len(test))] == ["r0", "r5"]
    records = [{"image": "a.png", "captions": ["x"], "group": "cats"},
               {"image": "b.png", "caption": "y", "group": "dogs"},
               {"image": "c.png", "captions": ["z"], "group": "cats"},
               {"image": "a.png", "captions": ["w"]}]
    src = LocalSource(records, tmp_path, "all")
    assert [src[i]["group_id"] for i in range(4)] == [0, 1, 0, 3]
    assert src[1]["captions"] == ["y"]


def test_jsonl_errors_name_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "a.png", "captions": ["x"]}) + "\n{oops\n")
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        LocalSource.from_jsonl(bad)
    bad.write_text(json.dumps({"captions": ["x"]}) + "\n")
    with pytest.raises(ValueError, match="record 1: needs an 'image' field"):
        LocalSource.from_jsonl(bad)
    with pytest.raises(ValueError, match="unknown data kind"):
        open_source({"kind": "csv"}, "train")


def test_folder_with_captions_file(tmp_path, make_png):
    for name in ("a.png", "b.png", "orphan.png"):
        (tmp_path / name).write_bytes(make_png(len(name)))
    (tmp_path / "captions.tsv").write_text(
        "# filename<TAB>caption\na.png#0\tA red square.\na.png#1\tSomething red\n"
        "b.png\tnoise\n")
    src = open_source({"kind": "folder", "path": str(tmp_path)}, "all")
    assert len(src) == 2 and src.images_without_captions == 1
    ex = src[0]
    assert_example(ex)
    assert ex["captions"] == ["A red square.", "Something red"] and ex["source_id"] == "a.png"
    (tmp_path / "captions.tsv").write_text("a.png no tab here\n")
    with pytest.raises(ValueError, match="filename<TAB>caption"):
        LocalSource.from_folder(tmp_path)
