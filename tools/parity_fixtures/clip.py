"""A tiny random CLIPModel and its Hugging Face outputs.

``clip_tiny/``: CLIPModel saved by ``save_pretrained`` (model.safetensors + config.json):
vision hidden 32, 2 layers, 4 heads, image 32, patch 8, mlp 37; text hidden 32, vocab 99,
2 layers, 4 heads, 16 positions, mlp 37, eos_token_id 50 (pooling at the first EOS);
projection 24. Biases and layer-norm parameters are perturbed away from their 0/1 init so
that a swapped or skipped one shows up in the outputs.
``clip_tiny/vision_only/``: the vision tower saved as a transformers-5 CLIPVisionModel.

golden.npz:
  pixel_values [2, 3, 32, 32] (NCHW), input_ids [3, 10], attention_mask [3, 10] (row 1 is
  padded with the EOS id, row 2 with pad id 1), vision_last_hidden_state [2, 17, 32],
  vision_pooler_output [2, 32], text_last_hidden_state [3, 10, 32], text_pooler_output
  [3, 32], text_pooler_output_legacy [3, 32] (same weights, eos_token_id 2: argmax pooling),
  image_embeds [2, 24], text_embeds [3, 24] (both L2-normalised, as CLIPModel returns them),
  logits_per_image [2, 3].
"""

from pathlib import Path

import numpy as np
import torch
from transformers import CLIPConfig, CLIPModel, CLIPVisionModel

EOS, PAD = 50, 1
VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
              image_size=32, patch_size=8)
TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            vocab_size=99, max_position_embeddings=16, eos_token_id=EOS, pad_token_id=PAD,
            bos_token_id=0)


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Move biases and layer norms off their trivial init, deterministically."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name.lower():
                p.add_(0.1 * torch.randn(p.shape, generator=gen))


def token_ids(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Rows: full length; padded with EOS after 6 tokens; padded with PAD after 8 tokens.
    Ids above EOS sit before it, so argmax (legacy) and first-EOS pooling differ."""
    t = 10
    ids = rng.integers(2, 99, (3, t))
    ids[ids == EOS] = EOS + 1
    mask = np.ones((3, t), np.int64)
    for row, length, pad in ((0, t, PAD), (1, 6, EOS), (2, 8, PAD)):
        ids[row, length - 1] = EOS
        ids[row, length:] = pad
        mask[row, length:] = 0
    ids[2, 2] = 98  # the highest id, before EOS
    return ids.astype(np.int64), mask


def make(out: Path) -> None:
    root = out / "clip_tiny"
    torch.manual_seed(0)
    config = CLIPConfig(vision_config=VISION, text_config=TEXT, projection_dim=24)
    config._attn_implementation = "eager"
    model = CLIPModel(config).eval()
    perturb(model, 0)
    model.save_pretrained(root)

    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    ids, mask = token_ids(rng)
    t = lambda a: torch.as_tensor(a)
    with torch.no_grad():
        full = model(input_ids=t(ids), attention_mask=t(mask), pixel_values=t(pixels))
        # CLIPModel (transformers 5) overwrites the towers' pooler_output with the projected
        # vectors, so the towers are run on their own for the unprojected outputs.
        vision = model.vision_model(pixel_values=t(pixels))
        text = model.text_model(input_ids=t(ids), attention_mask=t(mask))
        model.text_model.eos_token_id = 2
        legacy = model.text_model(input_ids=t(ids), attention_mask=t(mask)).pooler_output
        model.text_model.eos_token_id = EOS
    np.savez(root / "golden.npz", pixel_values=pixels, input_ids=ids, attention_mask=mask,
             vision_last_hidden_state=vision.last_hidden_state.numpy(),
             vision_pooler_output=vision.pooler_output.numpy(),
             text_last_hidden_state=text.last_hidden_state.numpy(),
             text_pooler_output=text.pooler_output.numpy(),
             text_pooler_output_legacy=legacy.numpy(),
             image_embeds=full.image_embeds.numpy(), text_embeds=full.text_embeds.numpy(),
             logits_per_image=full.logits_per_image.numpy())

    vision_only = CLIPVisionModel(config.vision_config).eval()
    vision_only.load_state_dict({k[len("vision_model."):]: v
                                 for k, v in model.state_dict().items()
                                 if k.startswith("vision_model.")})
    vision_only.save_pretrained(root / "vision_only")
    print(f"wrote {root}")
