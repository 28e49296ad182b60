"""Per-split token tables, made once on the host from a data source.

Training steps gather from these by example row (the pipeline's ``source_id``), so a step
needs only row indices (plus pixels when the image tower runs in the step):

* ``text_ids/text_mask [N, R, Lt]``: the R training captions of each example, text-tower
  tokens (the contrastive targets and the datastore keys).
* ``dec_ids/dec_mask [N, R, Ld]``: the same captions for the decoder: ``BOS w_1..w_n EOS``.
* ``prefix_ids/prefix_mask [N, R, C, Lt]``: the text-tower tokens of ``w_1..w_{c*chunk}``:
  the query text the generation loop forms at the start of chunk c (decoded from decoder
  tokens and re-encoded, exactly as generation does when the vocabularies differ);
  ``prefix_valid [N, R, C]`` is False where the prefix would be empty (c = 0) or the whole
  caption (nothing is left to generate after it).
* ``count [N]`` captions per example, ``group_id [N]``, ``references`` (all reference texts,
  for CIDEr), ``texts`` (the captions as strings).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ravlm_jax.data.tokenizers import TextTokenizer


@dataclass
class CaptionTables:
    text_ids: np.ndarray
    text_mask: np.ndarray
    dec_ids: np.ndarray
    dec_mask: np.ndarray
    prefix_ids: np.ndarray
    prefix_mask: np.ndarray
    prefix_valid: np.ndarray
    count: np.ndarray
    group_id: np.ndarray
    texts: list[list[str]] = field(default_factory=list)
    references: list[list[str]] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.count)

    @property
    def chunks(self) -> int:
        return self.prefix_ids.shape[2]

    def device_arrays(self) -> dict[str, np.ndarray]:
        """What a jitted step gathers from."""
        return {k: getattr(self, k) for k in (
            "text_ids", "text_mask", "dec_ids", "dec_mask", "prefix_ids", "prefix_mask",
            "prefix_valid", "count")}


def decoder_ids(tok: TextTokenizer, texts: list[str], max_len: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """``BOS w_1..w_n EOS`` right-padded, for any tokenizer (GPT-2 adds no specials)."""
    ids = np.full((len(texts), max_len), tok.pad_id, np.int32)
    mask = np.zeros((len(texts), max_len), np.int32)
    for i, text in enumerate(texts):
        words = tok.encode(text, add_special_tokens=False)[: max_len - 2]
        seq = [tok.bos_id, *words, tok.eos_id]
        ids[i, : len(seq)] = seq
        mask[i, : len(seq)] = 1
    return ids, mask


def payload_ids(tok: TextTokenizer, texts: list[str], max_len: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Retrieved-caption tokens for the decoder's memory: words only, no BOS/EOS."""
    ids = np.full((len(texts), max_len), tok.pad_id, np.int32)
    mask = np.zeros((len(texts), max_len), np.int32)
    for i, text in enumerate(texts):
        words = tok.encode(text, add_special_tokens=False)[:max_len]
        ids[i, : len(words)] = words
        mask[i, : len(words)] = 1
    return ids, mask


def num_chunks(dec_len: int, chunk_len: int) -> int:
    """Chunks covering the ``dec_len - 1`` teacher-forced input positions."""
    return math.ceil((dec_len - 1) / chunk_len)


@dataclass
class SplitCaptions:
    """The text side of a split: up to R training captions per example, all references,
    and the leakage group of each example."""

    texts: list[list[str]]
    references: list[list[str]]
    group_id: np.ndarray

    @classmethod
    def read(cls, source, max_captions: int = 1) -> SplitCaptions:
        n = len(source)
        texts, refs, groups = [], [], np.zeros(n, np.int64)
        for i in range(n):
            ex = source[i]
            texts.append([t for t in ex["captions"] if t.strip()][:max_captions] or [""])
            refs.append(source.references(i))
            groups[i] = int(ex["group_id"])
        return cls(texts, refs, groups)

    def all_texts(self) -> list[str]:
        return [t for caps in self.texts for t in caps]


def build_tables(captions: SplitCaptions, text_tok: TextTokenizer, dec_tok: TextTokenizer, *,
                 text_len: int, dec_len: int, chunk_len: int) -> CaptionTables:
    texts, refs, groups = captions.texts, captions.references, captions.group_id
    n = len(texts)
    r_max = max(len(t) for t in texts)
    c = num_chunks(dec_len, chunk_len)
    count = np.array([len(t) for t in texts], np.int32)
    flat = [t for caps in texts for t in caps]
    where = [(i, r) for i, caps in enumerate(texts) for r in range(len(caps))]

    def table(arr: np.ndarray, fill: int) -> np.ndarray:
        out = np.full((n, r_max) + arr.shape[1:], fill, arr.dtype)
        for (i, r), row in zip(where, arr, strict=True):
            out[i, r] = row
        return out

    t_ids, t_mask = text_tok.encode_batch(flat, text_len)
    d_ids, d_mask = decoder_ids(dec_tok, flat, dec_len)
    # prefixes: decode w_1..w_{c*chunk} from decoder tokens, re-encode for the text tower
    words = [row[1: m.sum() - 1] for row, m in zip(d_ids, d_mask, strict=True)]
    p_texts, p_valid = [], []
    for w in words:
        for ci in range(c):
            cut = ci * chunk_len
            p_valid.append(0 < cut < len(w))
            p_texts.append(dec_tok.decode(w[:cut]) if 0 < cut < len(w) else "")
    unique = sorted(set(p_texts))
    u_ids, u_mask = text_tok.encode_batch(unique, text_len)
    pos = {t: j for j, t in enumerate(unique)}
    sel = np.array([pos[t] for t in p_texts])
    valid = np.array(p_valid, bool).reshape(len(flat), c)
    p_ids = u_ids[sel].reshape(len(flat), c, text_len)
    p_mask = (u_mask[sel].reshape(len(flat), c, text_len) * valid[..., None]).astype(np.int32)
    return CaptionTables(
        text_ids=table(t_ids, text_tok.pad_id), text_mask=table(t_mask, 0),
        dec_ids=table(d_ids, dec_tok.pad_id), dec_mask=table(d_mask, 0),
        prefix_ids=table(p_ids, text_tok.pad_id), prefix_mask=table(p_mask, 0),
        prefix_valid=table(valid, False), count=count, group_id=groups, texts=texts,
        references=refs)


def caption_tables(config: Any, captions: SplitCaptions, text_tok: TextTokenizer,
                   dec_tok: TextTokenizer) -> CaptionTables:
    """:func:`build_tables` with the lengths a run config sets (text tower, decoder,
    chunks): what training, evaluation and datastore builds all tokenise with."""
    return build_tables(captions, text_tok, dec_tok,
                        text_len=int(config.data.texts.caption.max_len),
                        dec_len=int(config.model.get("caption_len", 24)),
                        chunk_len=int(config.model.captioner.chunk_len))
