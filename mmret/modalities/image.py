"""Pictures as people have them: any mode, any size, rotated by EXIF, sometimes broken.

`load_rgb` gives an 8-bit RGB picture for any file PIL can read (transparency composited on
white, palette / greyscale / CMYK / 16-bit converted, EXIF orientation applied), big JPEGs
decoded straight to near the size the caller needs. `probe_image`
reads just the size, or with `full=True` decodes everything to catch truncated files.
Both raise `ImageError` with a short reason instead of PIL's many exception types.

Both bound a picture by its header before anything is decoded (`check_size`, the one guard for
datasets and uploads): at most `MAX_PIXELS` pixels (PIL's own refusal limit; the server has its
own lower `--max-pixels`), a longer side of at most `MAX_SIDE` and an aspect ratio of at most
`MAX_ASPECT`. What a picture costs after decoding is bounded by the model's input size
(`mmret.encoders.preprocess.ResizeCrop`), so one picture costs a few bytes a decoded pixel
(a big JPEG is decoded at a reduced scale), whatever its shape.
`contact_sheet` draws search results as one picture; `thumbnail` a small copy (maps, galleries, a web page).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageOps

from mmret.modalities.base import ItemError, Modality, open_source, register_modality

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
_ROTATED = {5, 6, 7, 8}  # EXIF orientations that swap width and height
_EXIF_ORIENTATION = 0x0112
MAX_PIXELS = 2 * 89_478_485  # what PIL refuses as a decompression bomb (twice its warning limit)
MAX_SIDE = 65_535  # the longest side a JPEG can have
MAX_ASPECT = 1000  # the longer side over the shorter: the centre crop of a thinner strip is under 1/1000 of it


class ImageError(ItemError):
    """An image that cannot be used; the message is the reason."""


class TooLarge(ImageError):
    """A picture with more pixels, or a longer side, than the limit (known from its header)."""


class TooThin(ImageError):
    """A picture whose longer side is more than `MAX_ASPECT` times its shorter (known from its header)."""


def check_size(width: int, height: int, max_pixels: int = MAX_PIXELS) -> None:
    """The bounds every picture must keep, from its header: at most `max_pixels` pixels, a longer side
    of at most `MAX_SIDE`, an aspect ratio of at most `MAX_ASPECT`; else `TooLarge` or `TooThin`."""
    long, short = max(width, height), min(width, height)
    if short < 1:
        raise ImageError(f"its header says {width} x {height} pixels")
    if width * height > max_pixels:
        raise TooLarge(f"{width:,} x {height:,} pixels ({width * height:,}) is over the limit of {max_pixels:,} pixels")
    if long > MAX_SIDE:
        raise TooLarge(f"{width:,} x {height:,} pixels: a side is longer than the limit of {MAX_SIDE:,}")
    if long > MAX_ASPECT * short:
        raise TooThin(f"{width:,} x {height:,} pixels is thinner than the limit of 1:{MAX_ASPECT}")


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
        with warnings.catch_warnings():  # PIL warns above MAX_IMAGE_PIXELS, refuses above twice that: `check_size`
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
    except Image.DecompressionBombError:
        raise TooLarge(f"over the limit of {MAX_PIXELS:,} pixels") from None
    except Image.UnidentifiedImageError:
        raise ImageError("not an image PIL can read") from None
    except OSError as e:
        raise ImageError(f"cannot open: {e}") from None
    try:
        check_size(*img.size)
    except ImageError:
        img.close()
        raise
    return img


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


def load_rgb(path: str | Path | BinaryIO, draft: int | None = None) -> Image.Image:
    """Open, decode and orient an image; always an 8-bit RGB picture or an `ImageError`.

    `draft`: the caller needs no more than this many pixels on the shorter side. A JPEG is then
    decoded at 1/2, 1/4 or 1/8 scale in the DCT domain (PIL's draft mode), as small as keeps both
    sides >= `draft`: a 12-megapixel photo decodes several times faster, and the later resize
    starts from a picture already near its size."""
    img = _open(path)
    try:
        if draft and img.format == "JPEG":
            img.draft(None, (draft, draft))  # a square request: the same whatever the EXIF rotation
        img.load()
        try:  # in place: else PIL returns a copy of the whole picture even when it needs no turning
            ImageOps.exif_transpose(img, in_place=True)
        except Exception:  # broken EXIF: keep the pixels as stored
            pass
        return to_rgb(img)
    except ImageError:
        raise
    except Exception as e:
        raise ImageError(f"cannot decode: {e}") from None


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow's bundled scalable font (needs FreeType)
    except (TypeError, OSError):
        return ImageFont.load_default()


def _wrap(draw, text: str, font, width: int, lines: int) -> list[str]:
    """`text` cut into at most `lines` lines that fit `width` pixels (the last one ends in '…')."""
    out, word_list = [], text.split()
    while word_list and len(out) < lines:
        line = word_list.pop(0)
        while word_list and draw.textlength(f"{line} {word_list[0]}", font=font) <= width:
            line += " " + word_list.pop(0)
        while draw.textlength(line, font=font) > width and len(line) > 1:
            line = line[:-2] + "…"
        out.append(line)
    if word_list and out:
        out[-1] = out[-1].rstrip("…")[:-1] + "…"
    return out


MARKS = {"right": (30, 150, 60), "wrong": (200, 50, 40)}


def contact_sheet(rows: list, path: Path, roots: Any, columns: int = 5, thumb: int = 200) -> None:
    """Search results as one PNG people can read at a glance: for each query (`rows`: (title,
    [SheetItem])) its title, then a row of thumbnails with rank, score, id and captions under each;
    a green frame on the right item and a red one on the others when the query is a known caption.
    The pictures are read through `roots` (the gallery's dataset's)."""
    from PIL import ImageDraw

    from mmret.common.io import atomic_path

    if not any(items for _, items in rows):
        return
    title_font, font = _font(18), _font(13)
    pad, title_h, label_h = 10, 30, 4 * 16 + 6
    cell_w, cell_h = thumb + pad, thumb + label_h + pad
    row_h = title_h + cell_h * -(-max(len(items) for _, items in rows) // columns)
    sheet = Image.new("RGB", (columns * cell_w + pad, len(rows) * row_h + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, (title, items) in enumerate(rows):
        top = pad + r * row_h
        draw.text((pad, top + 4), _wrap(draw, title, title_font, columns * cell_w - pad, 1)[0], fill=(0, 0, 0),
                  font=title_font)
        for n, item in enumerate(items):
            x, y = pad + (n % columns) * cell_w, top + title_h + (n // columns) * cell_h
            if item.mark in MARKS:
                draw.rectangle([x - 3, y - 3, x + thumb + 2, y + thumb + 2], outline=MARKS[item.mark], width=4)
            try:
                with open_source(item.path, roots) as source:
                    img = load_rgb(source, draft=thumb)
                img.thumbnail((thumb, thumb))
                sheet.paste(img, (x + (thumb - img.width) // 2, y + (thumb - img.height) // 2))
            except ImageError as e:
                draw.text((x + 6, y + thumb // 2), f"unreadable: {e}"[:30], fill=(200, 0, 0), font=font)
            lines = [ln for text in item.label for ln in _wrap(draw, text, font, thumb, 2)][:4]
            for k, line in enumerate(lines):
                draw.text((x, y + thumb + 4 + 16 * k), line, fill=(0, 0, 0) if k else (60, 60, 60), font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")


def thumbnail(source: str | Path | BinaryIO, size: int) -> np.ndarray:
    """(H, W, 3) uint8: the picture (a path or an open binary file) shrunk to at most `size` pixels a
    side, aspect kept, oriented and in RGB. JPEGs are decoded at a reduced scale (`draft`), so a
    large photo costs a fraction of its full decode."""
    img = _open(source)
    try:
        img.draft("RGB", (2 * size, 2 * size))  # no-op for other formats
        img.load()
        try:  # in place: else PIL returns a copy of the whole picture even when it needs no turning
            ImageOps.exif_transpose(img, in_place=True)
        except Exception:  # broken EXIF: keep the pixels as stored
            pass
        img = to_rgb(img)
        img.thumbnail((size, size), Image.Resampling.BICUBIC)
    except ImageError:
        raise
    except Exception as e:
        raise ImageError(f"cannot decode: {e}") from None
    return np.asarray(img)


def as_picture(picture: Any, decode: Any = None) -> Image.Image:
    """A picture held in memory as `load_rgb` gives a file: a PIL image (EXIF orientation applied,
    as for a file) or a uint8 array (H, W), (H, W, 3) or (H, W, 4), in RGB."""
    if isinstance(picture, np.ndarray):
        if picture.dtype != np.uint8 or picture.ndim not in (2, 3) or (picture.ndim == 3 and picture.shape[2]
                                                                          not in (1, 3, 4)):
            raise ImageError(f"a pixel array must be uint8 of shape (H, W), (H, W, 3) or (H, W, 4), got "
                             f"{picture.dtype} {picture.shape}")
        picture = Image.fromarray(picture[..., 0] if picture.ndim == 3 and picture.shape[2] == 1 else picture)
    if not isinstance(picture, Image.Image):
        raise ImageError(f"not a picture: {type(picture).__name__}")
    try:
        try:
            picture = ImageOps.exif_transpose(picture)
        except Exception:  # broken EXIF: keep the pixels as stored
            pass
        return to_rgb(picture)
    except Exception as e:
        raise ImageError(f"cannot decode: {e}") from None


def _probe_columns(path: Path | BinaryIO, full: bool) -> dict[str, int]:
    width, height = probe_image(path, full=full)
    return {"width": width, "height": height}


IMAGE = register_modality(Modality(
    name="image", plural="images", short="i", noun="picture", unit="img", extensions=IMAGE_EXTENSIONS,
    probe=_probe_columns, decode=load_rgb, columns=("width", "height"), results_sheet=contact_sheet,
    thumbnail=thumbnail, accept=as_picture, given_as="a file path, a PIL image or a uint8 array (H, W, 3)"))
