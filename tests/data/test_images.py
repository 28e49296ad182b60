"""Safe decoding of every image mode users hand us, resize/crop and tower normalisation."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from ravlm_jax.data import images
from ravlm_jax.data.images import ImageError, decode_image


def encode(im: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    out = io.BytesIO()
    im.save(out, format=fmt, **kwargs)
    return out.getvalue()


def test_rgb_png_roundtrip_from_bytes_path_and_array(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    data = encode(Image.fromarray(pixels))
    (tmp_path / "a.png").write_bytes(data)
    for src in (data, tmp_path / "a.png", str(tmp_path / "a.png"), pixels):
        out = decode_image(src)
        assert out.dtype == np.uint8 and out.shape == (5, 7, 3)
        np.testing.assert_array_equal(out, pixels)


def test_exif_orientation_is_applied():
    im = Image.new("RGB", (8, 4), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    out = decode_image(encode(im, "JPEG", exif=exif.tobytes()))
    assert out.shape == (8, 4, 3)


def test_transparent_images_are_composited_on_white():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red; the rest fully transparent
    out = decode_image(encode(Image.fromarray(rgba, "RGBA")))
    assert out[0, 0].tolist() == [255, 0, 0] and out[1, 1].tolist() == [255, 255, 255]
    la = Image.fromarray(np.array([[[0, 0], [0, 255]]], np.uint8), "LA")
    assert decode_image(encode(la)).tolist() == [[[255] * 3, [0] * 3]]
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 255, 0, 255, 0] + [0] * 762)
    pal.putpixel((1, 0), 1)
    out = decode_image(encode(pal, transparency=0))
    assert out.tolist() == [[[255, 255, 255], [0, 255, 0]]]
    np.testing.assert_array_equal(decode_image(rgba), out := decode_image(encode(
        Image.fromarray(rgba, "RGBA"))))
    assert out.shape == (2, 2, 3)


def test_grey_16bit_cmyk_and_palette_become_rgb():
    grey = decode_image(encode(Image.fromarray(np.array([[0, 128, 255]], np.uint8), "L")))
    assert grey.shape == (1, 3, 3) and grey[0, 1].tolist() == [128] * 3
    sixteen = Image.fromarray(np.array([[0, 32896, 65535]], np.uint16))  # I;16
    out = decode_image(encode(sixteen))
    assert out[0, :, 0].tolist() == [0, 128, 255]
    cmyk = Image.new("CMYK", (3, 2), (0, 255, 255, 0))  # pure red in CMYK
    out = decode_image(encode(cmyk, "JPEG", quality=100))
    assert out.shape == (2, 3, 3) and out[0, 0, 0] > 240 and out[0, 0, 1:].max() < 15
    pal = Image.new("P", (1, 1))
    pal.putpalette([10, 20, 30] + [0] * 765)
    assert decode_image(encode(pal)).tolist() == [[[10, 20, 30]]]
    mono = Image.new("1", (2, 1), 1)
    assert decode_image(encode(mono)).tolist() == [[[255] * 3] * 2]


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_unreadable_images_raise_one_line_image_error(tmp_path, damage):
    data = encode(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")
    data = {"truncated": data[: len(data) // 2], "garbage": b"not an image\nat all",
            "empty": b""}[damage]
    path = tmp_path / f"{damage}.jpg"
    path.write_bytes(data)
    with pytest.raises(ImageError) as err:
        decode_image(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message


def test_missing_file_and_decompression_bomb():
    with pytest.raises(ImageError, match="no such image file"):
        decode_image("/nonexistent/image.png")
    data = encode(Image.new("L", (300, 200)))
    with pytest.raises(ImageError, match="decompression bomb"):
        decode_image(data, name="big.png", max_pixels=300 * 200 - 1)
    assert decode_image(data, max_pixels=300 * 200).shape == (200, 300, 3)


def test_bad_arrays_are_refused():
    with pytest.raises(ImageError, match="uint8"):
        decode_image(np.zeros((2, 2, 3), np.float32), name="x")
    with pytest.raises(ImageError, match="channels"):
        decode_image(np.zeros((2, 2, 5), np.uint8), name="x")


def test_resize_center_crop_follows_torchvision_rule():
    image = np.zeros((100, 200, 3), np.uint8)
    image[:, 50:150] = 255  # the centre square is white
    out = images.resize_center_crop(image, 50)
    assert out.shape == (50, 50, 3)  # short side 50, then the centre 50 x 50 crop
    assert out[:, 2:-2].min() == 255 and out[:, :2].min() > 200  # only bicubic edge ringing
    out = images.resize_center_crop(image, (20, 30), crop_fraction=0.5)
    assert out.shape == (20, 30, 3)
    same = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    assert images.resize_center_crop(same, 4) is same
    with pytest.raises(ValueError, match="crop_fraction"):
        images.resize_center_crop(image, 10, crop_fraction=0)


def test_normalize_matches_formula_and_towers():
    pixels = np.random.default_rng(1).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    mean, std = np.array(images.CLIP_MEAN), np.array(images.CLIP_STD)
    expected = (pixels / 255.0 - mean) / std
    out = images.normalize(pixels, images.CLIP_MEAN, images.CLIP_STD)
    assert out.dtype == np.float32 and out.shape == pixels.shape
    np.testing.assert_allclose(out, expected, atol=1e-5)
    clip = images.tower_normalization("clip")
    assert clip.mean == images.CLIP_MEAN and clip.crop_fraction == 1.0
    np.testing.assert_allclose(images.preprocess(pixels[0, :5, :5], 5, "clip"),
                               expected[0, :5, :5], atol=1e-5)
    with pytest.raises(ValueError, match="unknown image tower"):
        images.tower_normalization("resnet")


def test_efficientnet_constants_come_from_the_tower():
    efficientnet = pytest.importorskip("ravlm_jax.models.efficientnet")
    norm = images.tower_normalization("efficientnet")
    pixels = np.array([[[0, 127, 255]]], np.uint8)
    expected = (pixels.astype(np.float32) - np.ravel(efficientnet.MEAN)) / np.ravel(
        efficientnet.STD)
    np.testing.assert_allclose(images.normalize(pixels, norm.mean, norm.std), expected,
                               atol=1e-5)


def test_register_tower():
    images.register_tower("half", lambda: images.Normalization((0.5,) * 3, (0.5,) * 3))
    out = images.load_image(np.full((4, 4, 3), 255, np.uint8), 2, "half")
    np.testing.assert_allclose(out, np.ones((2, 2, 3)), atol=1e-6)
