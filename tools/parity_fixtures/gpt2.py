"""Tiny random GPT-2 language models and their Hugging Face outputs.

``gpt2_tiny/``: GPT2LMHeadModel with cross-attention (n_embd 32, 2 layers, 4 heads, vocab
99, 64 positions), lm_head tied to wte (so the safetensors file has no lm_head.weight).
``gpt2_tiny/plain_untied/``: the same sizes without cross-attention and with its own
lm_head. HF GPT-2 cross-attention reads memories of width n_embd only, so the memory width
here equals n_embd (SmallCap's fixture covers other widths).

golden.npz (cross-attention model):
  input_ids [2, 12], encoder_hidden_states [2, 7, 32], logits [2, 12, 99];
  encoder_attention_mask [2, 7] and logits_memory_masked;
  attention_mask [2, 12] (row 1 left-padded by 3), position_ids (cumsum - 1, as HF
  generate computes them) and logits_left_padded.
golden.npz (plain_untied): input_ids [2, 12], logits [2, 12, 99].
"""

from pathlib import Path

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel

SIZES = dict(vocab_size=99, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=98,
             eos_token_id=98)


def _model(seed: int, **kwargs) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(**SIZES, **kwargs)
    model = GPT2LMHeadModel(cfg).eval()
    model.config._attn_implementation = "eager"
    return model


def _logits(model: GPT2LMHeadModel, **inputs) -> np.ndarray:
    with torch.no_grad():
        return model(**{k: torch.as_tensor(v) for k, v in inputs.items()}).logits.numpy()


def make(out: Path) -> None:
    rng = np.random.default_rng(0)
    root = out / "gpt2_tiny"

    model = _model(0, add_cross_attention=True)
    model.save_pretrained(root)
    ids = rng.integers(0, SIZES["vocab_size"], (2, 12)).astype(np.int64)
    enc = rng.standard_normal((2, 7, SIZES["n_embd"])).astype(np.float32)
    enc_mask = np.ones((2, 7), np.int64)
    enc_mask[1, 5:] = 0
    attn_mask = np.ones((2, 12), np.int64)
    attn_mask[1, :3] = 0
    positions = np.clip(attn_mask.cumsum(-1) - 1, 0, None)
    np.savez(root / "golden.npz", input_ids=ids, encoder_hidden_states=enc,
             logits=_logits(model, input_ids=ids, encoder_hidden_states=enc),
             encoder_attention_mask=enc_mask,
             logits_memory_masked=_logits(model, input_ids=ids, encoder_hidden_states=enc,
                                          encoder_attention_mask=enc_mask),
             attention_mask=attn_mask, position_ids=positions,
             logits_left_padded=_logits(model, input_ids=ids, encoder_hidden_states=enc,
                                        attention_mask=attn_mask, position_ids=positions))

    plain = _model(1, tie_word_embeddings=False)
    plain.save_pretrained(root / "plain_untied")
    np.savez(root / "plain_untied" / "golden.npz", input_ids=ids,
             logits=_logits(plain, input_ids=ids))
    print(f"wrote {root}")
