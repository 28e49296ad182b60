import json
import math

import numpy as np
import pytest

from ravlm_jax.evaluate import bleu, caption_metrics, cider_d, recall_at_k, rouge_l, tokenize


def test_tokenize_drops_punctuation_and_lowercases():
    assert tokenize("A Cat, sitting on the mat.") == ["a", "cat", "sitting", "on", "the", "mat"]
    assert tokenize("dog's face!") == ["dog's", "face"]


def test_bleu_hand_computed():
    # p1..p4 = 4/5, 3/4, 2/3, 1/2; equal lengths: no brevity penalty.
    b = bleu({"x": "a b c d e"}, {"x": ["a b c d f"]})
    assert b[0] == pytest.approx(0.8)
    assert b[1] == pytest.approx(math.sqrt(0.8 * 0.75))
    assert b[3] == pytest.approx((0.8 * 0.75 * (2 / 3) * 0.5) ** 0.25)
    # brevity penalty exp(1 - 6/3) when the hypothesis is half the closest reference
    short = bleu({"x": "the cat sat"}, {"x": ["the cat sat on the mat"]})
    assert short[0] == pytest.approx(math.exp(-1.0))


def test_rouge_l_hand_computed():
    assert rouge_l({"x": "a b c d e"}, {"x": ["a b c d f"]}) == pytest.approx(0.8)
    # LCS 2: precision 1, recall 0.5, beta 1.2
    assert rouge_l({"x": "a b"}, {"x": ["a c b d"]}) == pytest.approx(
        (1 + 1.44) * 0.5 / (0.5 + 1.44))


def test_cider_d_hand_computed():
    # two images, ref_len = log 2; image A matches exactly on 1- and 2-grams -> mean
    # ([1, 1, 0, 0]) * 10 = 5; image B shares nothing -> 0.
    mean, each = cider_d({"A": "a b", "B": "c"}, {"A": ["a b"], "B": ["d"]})
    assert each["A"] == pytest.approx(5.0)
    assert each["B"] == pytest.approx(0.0)
    assert mean == pytest.approx(2.5)


def test_metrics_match_coco_caption_reference(fixtures_dir):
    golden = json.loads((fixtures_dir / "caption_metrics_golden.json").read_text())
    hyps, refs = golden["hypotheses"], golden["references"]
    mean, each = cider_d(hyps, refs)
    assert mean == pytest.approx(golden["cider"], rel=1e-9)
    np.testing.assert_allclose([each[k] for k in hyps], golden["cider_each"], rtol=1e-9)
    np.testing.assert_allclose(bleu(hyps, refs), golden["bleu"], rtol=1e-9)
    assert rouge_l(hyps, refs) == pytest.approx(golden["rouge_l"], rel=1e-9)
    m = caption_metrics(hyps, refs)
    assert set(m) == {"cider", "bleu4", "rouge_l"}


def test_recall_at_k():
    ranked = np.array([[3, 1, 2], [0, 5, -1], [7, 8, 9]])
    r = recall_at_k(ranked, np.array([3, 5, 1]), ks=(1, 2, 3))
    assert r == {"recall@1": pytest.approx(1 / 3), "recall@2": pytest.approx(2 / 3),
                 "recall@3": pytest.approx(2 / 3)}
    r = recall_at_k(ranked, [{2, 9}, {4}, {8}], ks=(1, 3))
    assert r["recall@1"] == 0.0 and r["recall@3"] == pytest.approx(2 / 3)
