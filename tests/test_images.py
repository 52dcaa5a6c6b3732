"""Images as people have them: every mode PIL reads, EXIF rotation, odd sizes, broken files.

Each case is written to disk in its real format and read back through `load_rgb` (and, for the
size cases, through an encoder transform), checking the pixels, not just that nothing raised.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from mmret.encoders import ImagePreprocess, ImageTransform
from mmret.modalities.image import ImageError, load_rgb, probe_image

RED = (220, 30, 30)


def _pixel(img: Image.Image, xy=(0, 0)) -> tuple[int, int, int]:
    return img.getpixel(xy)


def test_rgba_is_composited_on_white(tmp_path):
    img = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # fully transparent black
    img.putpixel((1, 1), (255, 0, 0, 255))  # one opaque red pixel
    img.putpixel((2, 2), (0, 0, 255, 128))  # half-transparent blue
    img.save(tmp_path / "a.png")
    out = load_rgb(tmp_path / "a.png")
    assert out.mode == "RGB" and out.size == (8, 8)
    assert _pixel(out) == (255, 255, 255)  # transparent -> white, not black
    assert _pixel(out, (1, 1)) == (255, 0, 0)
    r, g, b = _pixel(out, (2, 2))
    assert 125 <= r <= 129 and 125 <= g <= 129 and b == 255  # blended halfway with white


def test_grey_with_alpha_is_composited_on_white(tmp_path):
    Image.new("LA", (4, 4), (0, 0)).save(tmp_path / "la.png")
    assert _pixel(load_rgb(tmp_path / "la.png")) == (255, 255, 255)


def test_palette_with_and_without_transparency(tmp_path):
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([*RED, 0, 0, 255] + [0] * (256 * 3 - 6))
    pal.putpixel((1, 0), 1)
    pal.save(tmp_path / "p.png")
    out = load_rgb(tmp_path / "p.png")
    assert _pixel(out) == RED and _pixel(out, (1, 0)) == (0, 0, 255)
    pal.info["transparency"] = 0  # index 0 (red) becomes transparent
    pal.save(tmp_path / "pt.png", transparency=0)
    out = load_rgb(tmp_path / "pt.png")
    assert _pixel(out) == (255, 255, 255) and _pixel(out, (1, 0)) == (0, 0, 255)


def test_palette_gif(tmp_path):
    Image.new("RGB", (6, 6), RED).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "g.gif")
    assert Image.open(tmp_path / "g.gif").mode == "P"
    assert _pixel(load_rgb(tmp_path / "g.gif")) == RED


@pytest.mark.parametrize("mode", ["L", "1"])
def test_greyscale_and_bilevel(tmp_path, mode):
    Image.new(mode, (5, 3), 255 if mode == "L" else 1).save(tmp_path / "g.png")
    out = load_rgb(tmp_path / "g.png")
    assert out.mode == "RGB" and out.size == (5, 3) and _pixel(out) == (255, 255, 255)


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=95)  # cyan 0, magenta+yellow: red
    r, g, b = _pixel(load_rgb(tmp_path / "c.jpg"), (8, 8))
    assert r > 200 and g < 40 and b < 40


def test_16bit_greyscale_scales_the_range(tmp_path):
    arr = np.array([[0, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "16.png")
    assert Image.open(tmp_path / "16.png").mode.startswith("I")
    out = np.asarray(load_rgb(tmp_path / "16.png"))
    assert out.shape == (1, 3, 3)
    assert out[0, :, 0].tolist() == [0, 128, 255]  # scaled, not clipped to white


def test_32bit_integer_tiff(tmp_path):
    Image.fromarray(np.array([[0, 1000, 65535]], dtype=np.int32), mode="I").save(tmp_path / "i.tif")
    out = np.asarray(load_rgb(tmp_path / "i.tif"))
    assert out[0, 0, 0] == 0 and out[0, 2, 0] == 255 and 0 < out[0, 1, 0] < 10


@pytest.mark.parametrize("orientation,expected_size,red_corner", [
    (1, (30, 20), (0, 0)),
    (3, (30, 20), (29, 19)),  # rotated 180
    (6, (20, 30), (19, 0)),  # rotated 90 clockwise to display
    (8, (20, 30), (0, 29)),  # rotated 90 counter-clockwise
])
def test_exif_orientation_is_applied(tmp_path, orientation, expected_size, red_corner):
    img = Image.new("RGB", (30, 20), (255, 255, 255))
    img.paste(RED, (0, 0, 6, 6))  # a red block in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(tmp_path / "o.jpg", exif=exif.tobytes(), quality=95)
    out = load_rgb(tmp_path / "o.jpg")
    assert out.size == expected_size
    assert probe_image(tmp_path / "o.jpg") == expected_size
    r, g, b = _pixel(out, red_corner)
    assert r > 180 and g < 80 and b < 80


@pytest.mark.parametrize("size", [(1, 1), (3, 400), (700, 5), (1500, 1100)])
def test_any_size_becomes_the_model_input(tmp_path, size):
    Image.new("RGB", size, RED).save(tmp_path / "s.png")
    pre = ImagePreprocess((32, 32), 36, "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    x = ImageTransform(pre)(load_rgb(tmp_path / "s.png"))
    assert tuple(x.shape) == (3, 32, 32)
    expected = [(c / 255 - 0.5) / 0.5 for c in RED]
    assert np.allclose(x.mean(dim=(1, 2)).numpy(), expected, atol=0.02)


@pytest.mark.parametrize("orientation", [1, 6])
def test_big_jpegs_decode_in_draft_mode_near_the_size_needed(tmp_path, orientation):
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).resize((1600, 1200), Image.BICUBIC)
    exif = Image.Exif()
    exif[0x0112] = orientation
    photo.save(tmp_path / "big.jpg", quality=92, exif=exif.tobytes())
    photo.save(tmp_path / "big.png")
    pre = ImagePreprocess((224, 224), 256, "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    transform = ImageTransform(pre)
    assert transform.source_side == 256 and ImageTransform(pre, train=True, scale=(0.25, 1)).source_side == 448
    full, small = load_rgb(tmp_path / "big.jpg"), load_rgb(tmp_path / "big.jpg", draft=256)
    assert full.size == ((1600, 1200) if orientation == 1 else (1200, 1600))
    assert small.size == ((400, 300) if orientation == 1 else (300, 400))  # 1/4 scale: the shorter side >= 256
    assert load_rgb(tmp_path / "big.png", draft=256).size == (1600, 1200)  # not a JPEG: decoded whole
    assert load_rgb(tmp_path / "big.jpg", draft=1000).size == full.size  # no scale keeps 1000 pixels
    x, y = transform(full), transform(small)
    assert (x - y).abs().max() < 0.1 and (x - y).abs().mean() < 0.01  # what the model sees barely changes


def _truncated_jpeg(path):
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buf, "JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


@pytest.mark.parametrize("make,reason", [
    (lambda p: p.write_bytes(b""), "empty file"),
    (lambda p: p.write_bytes(b"this is not an image at all" * 10), "not an image"),
    (_truncated_jpeg, "cannot decode"),
    (lambda p: None, "file not found"),
])
def test_broken_files_raise_image_error_with_a_reason(tmp_path, make, reason):
    path = tmp_path / "bad.jpg"
    make(path)
    with pytest.raises(ImageError, match=reason):
        load_rgb(path)


def test_train_transform_crops_and_flips_but_keeps_the_size():
    img = Image.new("RGB", (50, 40), (255, 255, 255))
    img.paste(RED, (0, 0, 25, 40))  # left half red
    pre = ImagePreprocess((32, 32), 36, "bilinear", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    flips = set()
    for seed in range(20):
        import torch

        torch.manual_seed(seed)
        x = ImageTransform(pre, train=True, scale=(0.9, 1.0))(img)
        assert tuple(x.shape) == (3, 32, 32)
        flips.add(bool(x[1, :, 0].mean() > x[1, :, -1].mean()))  # green high = white on the left
    assert flips == {True, False}
    torch.manual_seed(0)
    no_flip = [ImageTransform(pre, train=True, hflip=False, scale=(0.9, 1.0))(img) for _ in range(10)]
    assert all(x[1, :, 0].mean() < x[1, :, -1].mean() for x in no_flip)
