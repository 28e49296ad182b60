"""A tiny random BertModel, its Hugging Face outputs, and torch-format probes for io.py.

``bert_tiny/``: BertModel (hidden 32, 2 layers, 4 heads, mlp 37, vocab 99, 64 positions,
2 token types, with pooler) saved as config.json + ``pytorch_model.bin`` written by
``torch.save`` in the zip format (transformers 5 only writes safetensors, and the point here
is the zip-pickle path of the loader). Biases and layer norms are perturbed off their init.

golden.npz: input_ids [3, 9], attention_mask [3, 9] (rows 1, 2 right-padded),
token_type_ids [3, 9], last_hidden_state [3, 9, 32], pooler_output [3, 32],
mean_pooled [3, 32] (sentence-transformers' masked mean), last_hidden_state_no_types
(token_type_ids omitted, i.e. zeros).

``bert_tiny/torch_formats/``: one small dict of tensors saved by torch in the zip format
(``zip.pt``) and in the legacy pre-1.6 format (``legacy.pt``), with what a reader must
return in ``expected.npz``: float32, a transposed (non-contiguous) view, a view at a storage
offset, float16, bfloat16 (stored as its float32 value), int64 and bool; nested under
``{"state_dict": ...}`` as trainer checkpoints do.
"""

from pathlib import Path

import numpy as np
import torch
from transformers import BertConfig, BertModel

SIZES = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=37, max_position_embeddings=64, type_vocab_size=2)


def perturb(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))


def mean_pool(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sentence_transformers.models.Pooling, mode mean."""
    m = mask.unsqueeze(-1).expand(tokens.size()).float()
    return torch.sum(tokens * m, 1) / torch.clamp(m.sum(1), min=1e-9)


def torch_formats(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(4, 6, generator=gen)
    flat = torch.arange(10, dtype=torch.float32)
    tensors = {
        "float32": base,
        "transposed": base.t(),
        "offset_view": flat[3:7],
        "float16": torch.randn(5, generator=gen).half(),
        "bfloat16": torch.randn(3, 2, generator=gen).bfloat16(),
        "int64": torch.arange(7) * 3,
        "bool": torch.tensor([True, False, True]),
    }
    torch.save({"state_dict": tensors, "epoch": 3}, root / "zip.pt")
    torch.save({"state_dict": tensors, "epoch": 3}, root / "legacy.pt",
               _use_new_zipfile_serialization=False)
    np.savez(root / "expected.npz", **{k: (v.float() if v.dtype == torch.bfloat16 else v).numpy()
                                       for k, v in tensors.items()})


def make(out: Path) -> None:
    root = out / "bert_tiny"
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = BertConfig(**SIZES)
    config._attn_implementation = "eager"
    model = BertModel(config).eval()
    perturb(model, 0)
    model.config.save_pretrained(root)
    torch.save(model.state_dict(), root / "pytorch_model.bin")

    rng = np.random.default_rng(0)
    ids = rng.integers(1, 99, (3, 9)).astype(np.int64)
    ids[:, 0] = 2  # a CLS-like first token
    mask = np.ones((3, 9), np.int64)
    mask[1, 6:] = 0
    mask[2, 4:] = 0
    ids[mask == 0] = 0
    types = np.zeros((3, 9), np.int64)
    types[0, 5:] = 1
    t = lambda a: torch.as_tensor(a)
    with torch.no_grad():
        res = model(input_ids=t(ids), attention_mask=t(mask), token_type_ids=t(types))
        no_types = model(input_ids=t(ids), attention_mask=t(mask)).last_hidden_state
    np.savez(root / "golden.npz", input_ids=ids, attention_mask=mask, token_type_ids=types,
             last_hidden_state=res.last_hidden_state.numpy(),
             pooler_output=res.pooler_output.numpy(),
             mean_pooled=mean_pool(res.last_hidden_state, t(mask)).numpy(),
             last_hidden_state_no_types=no_types.numpy())
    torch_formats(root / "torch_formats")
    print(f"wrote {root}")
