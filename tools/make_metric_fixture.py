"""Golden caption-metric values from the coco-caption reference code (pycocoevalcap).

    pip install pycocoevalcap   # in any scratch environment; not a project dependency
    python tools/make_metric_fixture.py > tests/fixtures/caption_metrics_golden.json

Captions are already lowercase without punctuation, so PTB tokenisation (Java) is not needed
and pycocoevalcap's scorers see exactly the tokens our tokenizer produces.
"""

import json
import random

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

WORDS = "a cat dog red blue face with smiling man woman on the of big small heart".split()


def corpus(seed: int = 0, n: int = 12):
    rng = random.Random(seed)
    hyps, refs = {}, {}
    for i in range(n):
        base = [rng.choice(WORDS) for _ in range(rng.randint(2, 7))]
        refs[str(i)] = [" ".join(base)] + [
            " ".join(w if rng.random() > 0.3 else rng.choice(WORDS)
                     for w in base[: rng.randint(1, len(base))] + [rng.choice(WORDS)])
            for _ in range(rng.randint(1, 3))]
        hyp = [w if rng.random() > 0.4 else rng.choice(WORDS) for w in base]
        hyps[str(i)] = " ".join(hyp[: max(1, len(hyp) - rng.randint(0, 2))])
    return hyps, refs


def main():
    hyps, refs = corpus()
    res = {k: [v] for k, v in hyps.items()}
    cider, cider_each = Cider().compute_score(refs, res)
    bleus, _ = Bleu(4).compute_score(refs, res, verbose=0)
    rouge, _ = Rouge().compute_score(refs, res)
    print(json.dumps({"hypotheses": hyps, "references": refs, "cider": cider,
                      "cider_each": list(map(float, cider_each)), "bleu": bleus,
                      "rouge_l": rouge}, indent=1))


if __name__ == "__main__":
    main()
