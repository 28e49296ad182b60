"""Caption metrics (CIDEr-D, BLEU-4, ROUGE-L) and retrieval recall@k, without Java.

The caption metrics follow the coco-caption reference code (pycocoevalcap) formula for
formula: CIDEr-D with sigma 6, clipped tf-idf n-gram vectors, document frequencies over the
evaluated corpus and the x10 scale; corpus BLEU-4 with the "closest" reference length;
ROUGE-L with beta 1.2 over the best precision and recall across references. The only
difference is tokenisation: instead of the Stanford PTB tokenizer (Java) we lowercase, split
off punctuation and drop the punctuation tokens PTB would drop, which gives the same tokens
on ordinary captions.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence

import numpy as np

_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")
_PUNCT = set("'\"`.,?!:;-()[]{}") | {"--", "..."}


def tokenize(text: str) -> list[str]:
    """Lowercase words; punctuation removed (as coco-caption's PTB step does)."""
    return [t for t in _TOKEN.findall(text.lower()) if t not in _PUNCT]


def _ngrams(words: Sequence[str], n: int) -> Counter:
    counts: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i:i + k])] += 1
    return counts


# --------------------------------------------------------------------------- CIDEr-D

def cider_d(hypotheses: Mapping[str, str], references: Mapping[str, Sequence[str]],
            n: int = 4, sigma: float = 6.0) -> tuple[float, dict[str, float]]:
    """Corpus CIDEr-D. Returns (mean score, per-key scores)."""
    keys = list(hypotheses)
    hyp = {k: _ngrams(tokenize(hypotheses[k]), n) for k in keys}
    refs = {k: [_ngrams(tokenize(r), n) for r in references[k]] for k in keys}
    df: Counter = Counter()
    for k in keys:
        for gram in {g for r in refs[k] for g in r}:
            df[gram] += 1
    ref_len = math.log(float(len(keys))) if keys else 0.0

    def vec(counts):
        v = [defaultdict(float) for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for gram, tf in counts.items():
            i = len(gram) - 1
            v[i][gram] = float(tf) * (ref_len - math.log(max(1.0, df[gram])))
            norm[i] += v[i][gram] ** 2
            if i == 1:  # coco-caption counts the length in bigrams; kept for comparability
                length += tf
        return v, [math.sqrt(x) for x in norm], length

    def sim(vh, nh, lh, vr, nr, lr):
        delta = float(lh - lr)
        val = np.zeros(n)
        for i in range(n):
            for gram in vh[i]:
                val[i] += min(vh[i][gram], vr[i][gram]) * vr[i][gram]
            if nh[i] != 0 and nr[i] != 0:
                val[i] /= nh[i] * nr[i]
            val[i] *= math.exp(-(delta ** 2) / (2 * sigma ** 2))
        return val

    scores = {}
    for k in keys:
        vh, nh, lh = vec(hyp[k])
        total = np.zeros(n)
        for r in refs[k]:
            total += sim(vh, nh, lh, *vec(r))
        scores[k] = float(np.mean(total) / max(len(refs[k]), 1) * 10.0)
    mean = float(np.mean(list(scores.values()))) if scores else 0.0
    return mean, scores


# --------------------------------------------------------------------------- BLEU

def bleu(hypotheses: Mapping[str, str], references: Mapping[str, Sequence[str]],
         n: int = 4) -> list[float]:
    """Corpus BLEU-1..n as coco-caption computes it (closest reference length)."""
    tiny, small = 1e-15, 1e-9
    correct = [0] * n
    guess = [0] * n
    test_len = ref_len = 0
    for k, h in hypotheses.items():
        words = tokenize(h)
        ref_words = [tokenize(r) for r in references[k]]
        hyp_counts = _ngrams(words, n)
        max_ref: Counter = Counter()
        for r in ref_words:
            for gram, c in _ngrams(r, n).items():
                max_ref[gram] = max(max_ref[gram], c)
        for gram, c in hyp_counts.items():
            correct[len(gram) - 1] += min(c, max_ref[gram])
        for i in range(n):
            guess[i] += max(len(words) - i, 0)
        test_len += len(words)
        ref_len += min((abs(len(r) - len(words)), len(r)) for r in ref_words)[1]
    scores = []
    score = 1.0
    ratio = (test_len + tiny) / (ref_len + small)
    for i in range(n):
        score *= (correct[i] + tiny) / (guess[i] + small)
        b = score ** (1.0 / (i + 1))
        if ratio < 1:
            b *= math.exp(1 - 1 / ratio)
        scores.append(b)
    return scores


# --------------------------------------------------------------------------- ROUGE-L

def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(hypotheses: Mapping[str, str], references: Mapping[str, Sequence[str]],
            beta: float = 1.2) -> float:
    scores = []
    for k, h in hypotheses.items():
        words = tokenize(h)
        precs, recs = [], []
        for r in references[k]:
            rw = tokenize(r)
            lcs = _lcs(words, rw)
            precs.append(lcs / len(words) if words else 0.0)
            recs.append(lcs / len(rw) if rw else 0.0)
        p, r = max(precs, default=0.0), max(recs, default=0.0)
        scores.append(((1 + beta ** 2) * p * r) / (r + beta ** 2 * p) if p and r else 0.0)
    return float(np.mean(scores)) if scores else 0.0


def caption_metrics(hypotheses: Mapping[str, str], references: Mapping[str, Sequence[str]]
                    ) -> dict[str, float]:
    """{"cider": CIDEr-D, "bleu4": BLEU-4, "rouge_l": ROUGE-L}, on the usual 0-1 (BLEU,
    ROUGE) and 0-10 (CIDEr) scales."""
    return {"cider": cider_d(hypotheses, references)[0],
            "bleu4": bleu(hypotheses, references)[3],
            "rouge_l": rouge_l(hypotheses, references)}


# --------------------------------------------------------------------------- retrieval

def recall_at_k(ranked_ids: np.ndarray, relevant: Sequence[set[int]] | np.ndarray,
                ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """ranked_ids [Q, K] (best first, -1 pads); relevant: per query a set of ids, or one id
    per query. Recall@k = fraction of queries with a relevant id in the top k."""
    ranked_ids = np.asarray(ranked_ids)
    if isinstance(relevant, np.ndarray) and relevant.ndim == 1:
        relevant = [{int(r)} for r in relevant]
    out = {}
    for k in ks:
        hits = [bool(set(ranked_ids[i, :k].tolist()) & set(rel))
                for i, rel in enumerate(relevant)]
        out[f"recall@{k}"] = float(np.mean(hits)) if hits else 0.0
    return out
