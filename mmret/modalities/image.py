"""Pictures as people have them: any mode, any size, rotated by EXIF, sometimes broken.

`load_rgb` gives an 8-bit RGB picture for any file PIL can read (transparency composited on
white, palette / greyscale / CMYK / 16-bit converted, EXIF orientation applied). `probe_image`
reads just the size, or with `full=True` decodes everything to catch truncated files.
Both raise `ImageError` with a short reason instead of PIL's many exception types.
`contact_sheet` draws search results as one picture.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

from mmret.modalities.base import ItemError, Modality, open_source, register_modality

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
_ROTATED = {5, 6, 7, 8}  # EXIF orientations that swap width and height
_EXIF_ORIENTATION = 0x0112


class ImageError(ItemError):
    """An image that cannot be used; the message is the reason."""


def _open(path: str | Path | BinaryIO) -> Image.Image:
    if hasattr(path, "read"):  # an open binary file: a member of a tar shard, read in memory
        if path.seek(0, 2) == 0:
            raise ImageError("empty file (0 bytes)")
        path.seek(0)
    else:
        path = Path(path)
        if not path.is_file():
            raise ImageError("file not found")
        if path.stat().st_size == 0:
            raise ImageError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():  # PIL warns above MAX_IMAGE_PIXELS, refuses above twice that
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(path)
    except Image.DecompressionBombError as e:
        raise ImageError(f"too many pixels, possible decompression bomb ({e})") from None
    except Image.UnidentifiedImageError:
        raise ImageError("not an image PIL can read") from None
    except OSError as e:
        raise ImageError(f"cannot open: {e}") from None


def probe_image(path: str | Path | BinaryIO, full: bool = False) -> tuple[int, int]:
    """Width and height as displayed (EXIF rotation applied); `full` decodes every pixel."""
    img = _open(path)
    with img:
        width, height = img.size
        try:
            orientation = img.getexif().get(_EXIF_ORIENTATION)
        except Exception:  # a broken EXIF block is not a broken image
            orientation = None
        if full:
            try:
                img.load()
            except Exception as e:
                raise ImageError(f"cannot decode: {e}") from None
    if orientation in _ROTATED:
        width, height = height, width
    return width, height


def _to_8bit(img: Image.Image) -> Image.Image:
    """16- and 32-bit greyscale to 8-bit by scaling the value range, not by clipping."""
    arr = np.asarray(img, dtype=np.float64)
    hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
    return Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert a PIL image of any mode to RGB, compositing transparency onto `background`."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        img = _to_8bit(img)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if img.mode != "RGB":
        img = img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV
    return img


def load_rgb(path: str | Path | BinaryIO) -> Image.Image:
    """Open, decode and orient an image; always an 8-bit RGB picture or an `ImageError`."""
    img = _open(path)
    try:
        img.load()
        try:
            img = ImageOps.exif_transpose(img)
        except Exception:  # broken EXIF: keep the pixels as stored
            pass
        return to_rgb(img)
    except ImageError:
        raise
    except Exception as e:
        raise ImageError(f"cannot decode: {e}") from None


def contact_sheet(items: list[tuple[str, str]], path: Path, columns: int = 5, thumb: int = 160) -> None:
    """A grid of pictures, each with a label under it (e.g. rank and score), written as one PNG."""
    from PIL import ImageDraw

    from mmret.common.io import atomic_path

    if not items:
        return
    label_h = 28
    rows = (len(items) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * thumb, rows * (thumb + label_h)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for n, (picture, label) in enumerate(items):
        x, y = (n % columns) * thumb, (n // columns) * (thumb + label_h)
        try:
            img = load_rgb(open_source(picture))
            img.thumbnail((thumb - 8, thumb - 8))
            sheet.paste(img, (x + (thumb - img.width) // 2, y + (thumb - img.height) // 2))
        except ImageError as e:
            draw.text((x + 6, y + thumb // 2), f"unreadable: {e}"[:24], fill=(200, 0, 0))
        draw.text((x + 6, y + thumb + 4), label[:26], fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")


def _probe_columns(path: Path | BinaryIO, full: bool) -> dict[str, int]:
    width, height = probe_image(path, full=full)
    return {"width": width, "height": height}


IMAGE = register_modality(Modality(
    name="image", plural="images", short="i", noun="picture", unit="img", extensions=IMAGE_EXTENSIONS,
    probe=_probe_columns, decode=load_rgb, columns=("width", "height"), results_sheet=contact_sheet))
