"""Safe image decoding and the per-tower preprocessing shared by the pipeline and infer.py.

Anything a user can hand us (JPEG with EXIF rotation, CMYK, 16-bit, palette, greyscale,
transparent PNG, a decompression bomb, a truncated file) either becomes an RGB ``uint8``
``[H, W, 3]`` array or raises a one-line :class:`ImageError` naming the file. Nothing here
decodes with TensorFlow.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps

# A 50-megapixel cap (an 8k x 6k photo) stops decompression bombs before any pixel is
# decoded; PIL's own limit is only a warning below 2x its MAX_IMAGE_PIXELS.
MAX_PIXELS = 50_000_000

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
             "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}

ImageSource = bytes | str | os.PathLike | np.ndarray | Image.Image


class ImageError(ValueError):
    """An image that cannot be used; the message is one line and names the file."""


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _open(src: ImageSource, name: str) -> Image.Image:
    if isinstance(src, Image.Image):
        return src
    if isinstance(src, (bytes, bytearray, memoryview)):
        if not len(src):
            raise ImageError(f"{name}: empty image data")
        return Image.open(io.BytesIO(bytes(src)))
    path = Path(src)
    if not path.is_file():
        raise ImageError(f"{name}: no such image file")
    return Image.open(path)


def _to_uint8_rgb(im: Image.Image) -> np.ndarray:
    """Any PIL mode -> RGB uint8 [H, W, 3]; transparency is composited on white."""
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, np.float64)
        if mode != "F":  # 16-bit (PIL also opens 16-bit PNGs as 32-bit "I")
            arr = arr / 257.0
        grey = np.clip(np.rint(arr), 0, 255).astype(np.uint8)  # [H, W]
        return np.repeat(grey[..., None], 3, axis=-1)  # [H, W, 3]
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif mode in ("LA", "PA", "La", "RGBa") or (mode in ("L", "RGB") and "transparency" in im.info):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im)
    if im.mode != "RGB":
        im = im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV
    return np.asarray(im, np.uint8)


def decode_image(src: ImageSource, *, name: str | None = None,
                 max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """bytes | path | PIL image | array -> RGB uint8 ``[H, W, 3]``, EXIF orientation applied.

    Raises :class:`ImageError` (one line, naming ``name`` or the path) for unreadable,
    truncated, empty or oversized (> ``max_pixels``) images.
    """
    if name is None:
        name = os.fspath(src) if isinstance(src, (str, os.PathLike)) else "<image bytes>"
    if isinstance(src, np.ndarray):
        return _array_to_rgb(src, name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = _open(src, name)
            width, height = im.size
            if width * height > max_pixels:
                raise ImageError(f"{name}: {width}x{height} pixels exceeds the limit of "
                                 f"{max_pixels} (possible decompression bomb)")
            im.load()  # raises on truncated data (LOAD_TRUNCATED_IMAGES stays False)
            im = ImageOps.exif_transpose(im)
            return _to_uint8_rgb(im)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{name}: decompression bomb ({_one_line(e)})") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error ...
        raise ImageError(f"{name}: cannot decode image ({type(e).__name__}: "
                         f"{_one_line(e)})") from None


def _array_to_rgb(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.ndim == 2:
        arr = arr[..., None]  # [H, W, 1]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise ImageError(f"{name}: expected an HWC image with 1, 3 or 4 channels, "
                         f"got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ImageError(f"{name}: expected a uint8 image array, got {arr.dtype}")
    if arr.shape[-1] == 1:
        return np.repeat(arr, 3, axis=-1)
    if arr.shape[-1] == 4:
        return _to_uint8_rgb(Image.fromarray(arr, "RGBA"))
    return arr


def resize_center_crop(image: np.ndarray, size: int | tuple[int, int], *,
                       crop_fraction: float = 1.0, resample: str = "bicubic") -> np.ndarray:
    """uint8 ``[H, W, 3]`` -> uint8 ``[h, w, 3]``: scale the short side to ``size /
    crop_fraction`` (aspect kept), then take the centre ``size`` crop (torchvision's rule)."""
    out_h, out_w = (size, size) if isinstance(size, int) else size
    if not 0.0 < crop_fraction <= 1.0:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
    if resample not in _RESAMPLE:
        raise ValueError(f"unknown resample {resample!r}; choose one of {sorted(_RESAMPLE)}")
    h, w = image.shape[:2]
    if (h, w) == (out_h, out_w) and crop_fraction == 1.0:
        return image
    short = max(out_h, out_w) / crop_fraction
    scale = short / min(h, w)
    new_h, new_w = max(out_h, round(h * scale)), max(out_w, round(w * scale))
    im = Image.fromarray(image).resize((new_w, new_h), _RESAMPLE[resample])
    top, left = round((new_h - out_h) / 2.0), round((new_w - out_w) / 2.0)
    return np.asarray(im.crop((left, top, left + out_w, top + out_h)), np.uint8)


def normalize(pixels: np.ndarray, mean, std) -> np.ndarray:
    """uint8 ``[..., W, C]`` -> float32 ``(x / 255 - mean) / std``; mean/std on the [0, 1]
    scale, one per channel."""
    x = np.asarray(pixels)
    channels = x.shape[-1]
    mean = np.broadcast_to(np.asarray(mean, np.float64), (channels,))
    std = np.broadcast_to(np.asarray(std, np.float64), (channels,))
    scale = (1.0 / (255.0 * std)).astype(np.float32)  # [C]
    offset = (-mean / std).astype(np.float32)  # [C]
    if x.ndim < 2:
        return x.astype(np.float32) * scale + offset
    # [..., W, C] -> [..., W * C]: numpy's inner loops are slow over a length-C axis, so
    # the per-channel constants are tiled along the row instead (6x faster at 96 px).
    width = x.shape[-2]
    rows = x.reshape(*x.shape[:-2], width * channels).astype(np.float32)  # [..., W*C]
    rows *= np.tile(scale, width)
    rows += np.tile(offset, width)
    return rows.reshape(x.shape)


class Normalization(NamedTuple):
    """How a tower wants its pixels: mean/std on the [0, 1] scale and its eval crop."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_fraction: float = 1.0


def _efficientnet() -> Normalization:
    from ravlm_jax.models import efficientnet  # constants live with the tower

    mean = tuple(float(m) / 255.0 for m in np.ravel(efficientnet.MEAN))
    std = tuple(float(s) / 255.0 for s in np.ravel(efficientnet.STD))
    return Normalization(mean, std, float(getattr(efficientnet, "CROP_FRACTION", 1.0)))


_TOWERS: dict[str, Callable[[], Normalization]] = {
    "clip": lambda: Normalization(CLIP_MEAN, CLIP_STD, 1.0),
    "efficientnet": _efficientnet,
    "unit": lambda: Normalization((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 1.0),  # [0, 1]
}


def register_tower(name: str, factory: Callable[[], Normalization]) -> None:
    """Add a tower's normalisation; ``factory`` may import the tower lazily."""
    _TOWERS[name] = factory


def tower_normalization(name: str) -> Normalization:
    if name not in _TOWERS:
        raise ValueError(f"unknown image tower {name!r}; choose one of {sorted(_TOWERS)}")
    return _TOWERS[name]()


def preprocess(image: np.ndarray, size: int, tower: str = "clip", *,
               crop_fraction: float | None = None, resample: str = "bicubic") -> np.ndarray:
    """RGB uint8 ``[H, W, 3]`` -> float32 ``[size, size, 3]`` normalised for ``tower``."""
    norm = tower_normalization(tower)
    crop = norm.crop_fraction if crop_fraction is None else crop_fraction
    resized = resize_center_crop(image, size, crop_fraction=crop, resample=resample)
    return normalize(resized, norm.mean, norm.std)


def load_image(src: ImageSource, size: int, tower: str = "clip", *, name: str | None = None,
               crop_fraction: float | None = None) -> np.ndarray:
    """decode + preprocess, as infer.py needs for one user image: float32 ``[size, size, 3]``."""
    return preprocess(decode_image(src, name=name), size, tower, crop_fraction=crop_fraction)
