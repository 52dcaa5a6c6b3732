"""The listening page: search results over sounds as one HTML file, in place of a contact sheet.

It takes what every results sheet takes (`[(title, [SheetItem])]`): for each query a section, for
each hit its lines (rank, score, id, then captions), an audio player and the log-mel spectrogram
of its first seconds (drawn with matplotlib's colour map and embedded as a PNG, so the page needs
no file but the sounds), framed green or red when the query is a known caption and the hit is or
is not its sound. Players point at the sound files by `file://` address, so the page plays them
where the dataset is; browsers open such pages from disk. A sound inside a tar shard has no
address a browser can open: its spectrogram is drawn and the player is left out. Text is
escaped; a file that cannot be read gets a line saying why instead of a picture.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mmret.common.io import atomic_path
from mmret.common.items import split_address
from mmret.modalities.base import ItemError, open_source

_MIME = {".wav": "audio/wav", ".flac": "audio/flac", ".ogg": "audio/ogg", ".oga": "audio/ogg",
         ".opus": "audio/ogg", ".mp3": "audio/mpeg"}
_MARKS = {"right": "#1e963c", "wrong": "#c83228"}
_STYLE = """body{font-family:sans-serif;margin:1.5em;color:#222}h2{margin-top:1.6em;font-size:1.15em}
table{border-collapse:collapse}td{padding:6px 10px;border-bottom:1px solid #ddd;vertical-align:middle}
.lines{font-size:90%;max-width:34em}.lines b{font-family:monospace}img{display:block;height:64px}
.bad{color:#b00}"""


def spectrogram_rgb(source: Any, load: Callable[..., np.ndarray], size: int | None = None,
                    seconds: float = 10.0) -> np.ndarray:
    """(64, W, 3) uint8 log-mel picture of the first `seconds` of a sound (magma colours), shrunk to
    at most `size` pixels a side; `load(source, sample_rate, seconds)` decodes it."""
    import matplotlib
    from PIL import Image

    from mmret.modalities.spectrogram import MelSettings, mel_picture

    settings = MelSettings(sample_rate=16_000, seconds=seconds, n_mels=64)
    picture = mel_picture(load(source, settings.sample_rate, seconds), settings, fill=False)
    rgb = (matplotlib.colormaps["magma"](picture)[..., :3] * 255).astype(np.uint8)
    image = Image.fromarray(rgb).resize((max(64, min(400, rgb.shape[1])), 64))
    if size:
        image.thumbnail((size, size))
    return np.asarray(image)


def _png(rgb: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _player(address: str) -> str:
    if split_address(address) is not None:
        return "<span>in a tar shard</span>"
    path = Path(address)
    mime = _MIME.get(path.suffix.lower(), "audio/*")
    return f'<audio controls preload="none"><source src="{path.absolute().as_uri()}" type="{mime}"></audio>'


def _hit_row(item: Any, load: Callable[..., np.ndarray], roots: Any) -> str:
    try:
        with open_source(item.path, roots) as source:
            picture = f'<img src="{_png(spectrogram_rgb(source, load))}" alt="spectrogram">'
    except ItemError as e:
        picture = f'<span class="bad">unreadable: {html.escape(str(e))}</span>'
    first, *rest = [html.escape(line) for line in item.label] or [""]
    lines = "<br>".join([f"<b>{first}</b>", *rest])
    frame = f' style="outline:4px solid {_MARKS[item.mark]}"' if item.mark in _MARKS else ""
    return f"<tr{frame}><td>{_player(str(item.path))}</td><td>{picture}</td><td class=lines>{lines}</td></tr>"


def listening_page(rows: list, path: Path, roots: Any, load: Callable[..., np.ndarray]) -> None:
    """Write search results (`[(title, [SheetItem])]`, as every results sheet takes them, the sounds
    read through `roots`) as one HTML page; `load(source, sample_rate, seconds)` decodes a sound to
    a mono waveform."""
    if not any(items for _, items in rows):
        return
    parts = ["<!doctype html><meta charset=utf-8><title>mmret search</title>", f"<style>{_STYLE}</style>"]
    for title, items in rows:
        parts.append(f"<h2>{html.escape(title)}</h2><table>")
        parts += [_hit_row(item, load, roots) for item in items]
        parts.append("</table>")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(parts) + "\n", encoding="utf-8")
