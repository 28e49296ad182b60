"""Evaluation of a trained run on a held-out split (``config.eval``).

* Captioning with k in ``eval.ks`` retrieved neighbours (k = 0: no retrieval, the same
  model), through the compiled generation loop: CIDEr-D, BLEU-4, ROUGE-L against every
  reference of the example (its captions and, for OpenMoji, its tags).
* Datastore swap (``eval.datastore_swap``): the same model with the split's own captions
  added to the datastore (SmallCap's training-free adaptation); an image's own group is
  excluded, so it never retrieves its own caption.
* Image-to-text retrieval recall@1/5/10 among the split's captions.

Results go to ``eval.json`` under stable keys: ``cider_k0``, ``bleu4_k4``, ``rouge_l_k8``,
``cider_swap_k4``, ``recall@1`` ..., plus a few sample captions with their neighbours.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from flax import nnx

from ravlm_jax.data.pipeline import loader_from_config
from ravlm_jax.data.sources import open_source
from ravlm_jax.evaluate import caption_metrics, recall_at_k
from ravlm_jax.generate import make_generator, retriever_for
from ravlm_jax.train import features as feats
from ravlm_jax.train.tables import SplitCaptions


def split_images(run, split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(image_tokens [N, Ti, Wi], pooled [N, Wi]) of a split, one pass of the towers."""
    _, loader = loader_from_config(run.config.data, split, batch_size=64, shuffle=False,
                                   num_epochs=1, remainder="pad")
    pooled, tokens = feats.image_features(run.model, loader, n, run.mesh, run.progress)
    return tokens, pooled


def generate_captions(run, gen, tokens: np.ndarray, pooled: np.ndarray, groups: np.ndarray
                      | None, batch_size: int) -> tuple[list[str], np.ndarray]:
    """Captions for every row, batch by batch (the last batch padded); returns the texts
    and the neighbours used [N, C, k]."""
    out_text, out_nb = [], []
    n = len(tokens)
    for start in range(0, n, batch_size):
        sl = slice(start, min(start + batch_size, n))
        pad = batch_size - (sl.stop - sl.start)
        t, p = tokens[sl], pooled[sl]
        g = None if groups is None else groups[sl]
        if pad:
            t = np.concatenate([t, np.repeat(t[-1:], pad, 0)])
            p = np.concatenate([p, np.repeat(p[-1:], pad, 0)])
            g = None if g is None else np.concatenate([g, np.repeat(g[-1:], pad, 0)])
        res = gen((t.astype(np.float32), p), exclude_group_ids=g)
        keep = batch_size - pad
        out_text += [run.dec_tok.decode(row) for row in res.tokens[:keep]]
        out_nb.append(res.neighbour_ids[:keep])
    return out_text, np.concatenate(out_nb) if out_nb else np.zeros((0, 0, 0), np.int32)


def evaluate_run(run, max_examples: int | None = None) -> dict[str, Any]:
    from ravlm_jax.train.loop import build_run_datastore, open_datastore, say

    config = run.config
    ecfg = config.eval
    t0 = time.perf_counter()
    split = str(ecfg.split)
    source = open_source(config.data, split)
    captions = SplitCaptions.read(source, int(config.data.get("max_captions", 1)))
    n = len(source)
    limit = max_examples or ecfg.get("max_examples")
    tokens, pooled = split_images(run, split, n)
    rows = np.arange(n if not limit else min(n, int(limit)))
    refs = {str(i): captions.references[i] for i in rows}
    groups = captions.group_id
    results: dict[str, Any] = {"split": split, "examples": len(rows)}
    batch = int(ecfg.batch_size)
    kind = str(config.retrieval.index)

    datastore = open_datastore(run)
    retriever = retriever_for(datastore, kind, mesh=run.mesh)
    samples: dict[int, dict] = {int(i): {"references": refs[str(i)][:3]} for i in rows[:8]}

    def run_k(k: int, retr, exclude: bool, tag: str) -> None:
        gen = make_generator(run.model, retr if k else None, config, k=k, mesh=run.mesh,
                             tokenizer=run.dec_tok, text_tokenizer=run.text_tok)
        texts, nbs = generate_captions(run, gen, tokens[rows], pooled[rows],
                                       groups[rows] if exclude else None, batch)
        hyps = {str(i): t for i, t in zip(rows, texts, strict=True)}
        m = caption_metrics(hyps, refs)
        for name, value in m.items():
            results[f"{name}_{tag}"] = value
        for j, i in enumerate(rows[:8]):
            samples[int(i)][tag] = texts[j]
            if k and tag == f"k{int(config.retrieval.k)}":
                first = nbs[j, 0]
                samples[int(i)]["neighbours"] = retr_texts(first[first >= 0])
        say(f"[eval] {tag}: CIDEr-D {m['cider']:.3f}  BLEU-4 {m['bleu4']:.3f}  "
            f"ROUGE-L {m['rouge_l']:.3f}")

    def retr_texts(ids: np.ndarray) -> list[str]:
        return datastore.payload(ids)["text"] if len(ids) else []

    for k in ecfg.ks:
        run_k(int(k), retriever, False, f"k{int(k)}")

    # image -> text recall among the split's captions
    enc_graph, enc_state = nnx.split(run.model.encoder)

    def img_fn(state, p):
        return nnx.merge(enc_graph, state).embed_image_pooled(p)

    def txt_fn(state, ids, mask):
        return nnx.merge(enc_graph, state).encode_text(ids, mask)

    tables = run.make_tables(captions)
    u_img = feats.batched_apply(img_fn, enc_state, (pooled[rows],), 256, run.mesh)
    flat_ids = tables.text_ids.reshape(-1, tables.text_ids.shape[-1])
    flat_mask = tables.text_mask.reshape(-1, tables.text_mask.shape[-1])
    owner = np.repeat(np.arange(n), tables.text_ids.shape[1])
    live = flat_mask.sum(-1) > 0
    u_txt = feats.batched_apply(txt_fn, enc_state, (flat_ids[live], flat_mask[live]), 128,
                                run.mesh)
    owner = owner[live]
    in_rows = np.isin(owner, rows)
    u_txt, owner = u_txt[in_rows], owner[in_rows]
    ks = tuple(int(k) for k in ecfg.recall_ks)
    ranked = np.argsort(-(u_img @ u_txt.T), axis=1)[:, :max(ks)]
    results.update(recall_at_k(owner[ranked], np.asarray(rows), ks))
    say("[eval] image->text " + "  ".join(f"R@{k} {results[f'recall@{k}']:.3f}" for k in ks))

    if ecfg.get("datastore_swap", False) and int(config.retrieval.k) > 0:
        path = build_run_datastore(run, run.workdir / f"datastore_swap_{split}", [
            (run.train_source, run.tables, run.features if run.cached else None, "train"),
            (source, tables, None, split)])
        from ravlm_jax.retrieval.datastore import Datastore

        swap = Datastore.load(path, mesh=run.mesh)
        k = int(config.retrieval.k)
        run_k(k, retriever_for(swap, kind, mesh=run.mesh), True, f"swap_k{k}")
        results["swap_datastore_size"] = swap.size
    results["datastore_size"] = datastore.size
    results["samples"] = samples
    results["seconds"] = round(time.perf_counter() - t0, 1)
    return results
