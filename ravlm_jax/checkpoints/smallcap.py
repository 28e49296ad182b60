"""SmallCap checkpoints (``model_type: smallcap``, e.g. ``Yova/SmallCap7M``) -> ViT + Decoder.

A SmallCap directory holds one state dict: the CLIP vision transformer under ``encoder.``
and a ``this_gpt2`` decoder (GPT-2 with reduced cross-attention) under ``decoder.``, with
its own ``lm_head`` (SmallCap sets ``tie_word_embeddings=False`` on the composite model).
The decoder attends to the vision encoder's ``last_hidden_state`` (no post-layernorm, no
projection), so cross-attention K/V read memories of the vision width.

SmallCap trains only the decoder parameters whose name contains ``crossattention``
(q_attn, c_attn, c_proj); the vision tower, the rest of GPT-2 and even ``ln_cross_attn``
stay frozen. :func:`smallcap_frozen` says the same of our parameter paths.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax.numpy as jnp

from ravlm_jax.checkpoints.clip import vision_from_state_dict
from ravlm_jax.checkpoints.gpt2 import decoder_from_state_dict
from ravlm_jax.checkpoints.io import (
    CheckpointError,
    load_state_dict,
    param_counts,
    read_config,
    resolve,
)
from ravlm_jax.models.decoder import Decoder, DecoderConfig
from ravlm_jax.models.vit import ViT, ViTConfig

log = logging.getLogger(__name__)

# SmallCap's prompt (src/template.txt, read with .strip() + " "): "||" is replaced by the
# top-k retrieved captions joined by "\n\n", followed by ".".
PROMPT_TEMPLATE = "Similar images show\n\n||\n\nThis image shows "
SIMPLE_PREFIX = "This image shows "  # SmallCap without retrieval
# SmallCap's infer.py generation settings (GPT-2 tokenizer: "!" = 0, "." = 13).
GENERATION = dict(num_beams=3, max_new_tokens=25, length_penalty=0.0, early_stopping=True,
                  no_repeat_ngram_size=0, pad_token="!", pad_token_id=0, eos_token=".",
                  eos_token_id=13)


def smallcap_frozen(path: str) -> bool:
    """True for every decoder parameter SmallCap freezes: all but the cross-attention
    projections (``blocks.N.cross_attn.*``; ``ln_cross_attn`` stays frozen)."""
    return "cross_attn" not in path.split(".")


def smallcap_prompt(captions: list[str], k: int, template: str = PROMPT_TEMPLATE) -> str:
    """The decoder prompt for retrieved ``captions`` (SmallCap's ``prep_strings``)."""
    return template.replace("||", "\n\n".join(captions[:k]) + ".")


def load_smallcap(name_or_path: str | os.PathLike, dtype: Any = jnp.float32
                  ) -> tuple[ViT, Decoder, dict[str, Any]]:
    """A SmallCap directory or hub id -> ``(vision, decoder, info)``.

    ``vision(pixels NHWC)[0]`` is the memory the decoder cross-attends to. ``info`` has
    ``k``, ``max_length``, ``rag``, ``retrieval_encoder``, the prompt facts
    (``prompt_template``, ``simple_prefix``, ``caption_separator``, ``captions_end``),
    SmallCap's ``generation`` settings, the decoder config and parameter counts."""
    directory = resolve(name_or_path)
    config = read_config(directory)
    if config.get("model_type") != "smallcap":
        raise CheckpointError(f"{directory}/config.json has model_type "
                              f"{config.get('model_type')!r}, expected 'smallcap'")
    if not isinstance(config.get("encoder"), dict) or not isinstance(config.get("decoder"), dict):
        raise CheckpointError(f"{directory}/config.json lacks the encoder / decoder sections")
    state_dict = load_state_dict(directory)
    stray = sorted(k for k in state_dict if not k.startswith(("encoder.", "decoder.")))
    if stray:
        raise CheckpointError(f"SmallCap checkpoint has tensors outside encoder./decoder.: "
                              f"{stray[:6]}")

    vision = vision_from_state_dict(config["encoder"], state_dict, "encoder.", dtype)
    try:
        dcfg = DecoderConfig.from_hf(config["decoder"],
                                     memory_width=ViTConfig.from_hf(config["encoder"]).width,
                                     tie_word_embeddings=False, dtype=dtype)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"SmallCap decoder config is not usable: {type(e).__name__}: "
                              f"{e}") from e
    if not dcfg.cross_attention:
        raise CheckpointError("SmallCap decoder config has add_cross_attention=False")
    decoder = decoder_from_state_dict(dcfg, state_dict, "decoder.")

    counts = {"vision": param_counts(vision, frozen=lambda _: True),
              "decoder": param_counts(decoder, frozen=smallcap_frozen)}
    log.info("SmallCap %s: reduce factor %d, params %s", directory,
             dcfg.cross_attention_reduce_factor, counts)
    info = {
        "k": config.get("k"),
        "max_length": config.get("max_length"),
        "rag": config.get("rag", True),
        "retrieval_encoder": config.get("retrieval_encoder"),
        "prompt_template": PROMPT_TEMPLATE,
        "simple_prefix": SIMPLE_PREFIX,
        "caption_separator": "\n\n",
        "captions_end": ".",
        "generation": dict(GENERATION),
        "decoder_config": dcfg,
        "param_counts": counts,
    }
    return vision, decoder, info
