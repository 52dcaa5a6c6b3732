"""Prompt templates that turn class names into captions for zero-shot classification.

`IMAGENET_TEMPLATES` are the 80 prompts of CLIP's ImageNet evaluation (Radford et al. 2021,
notebook "Prompt_Engineering_for_ImageNet"), in the form and order CLIP_benchmark ships them
(`en_zeroshot_classification_templates.json`, key `imagenet1k`): `{c}` stands for the class name.
Kept here as data so that a default classification run needs no download.
"""

from __future__ import annotations

import json
from pathlib import Path

from mmret.errors import MmretError

IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {c}.",
    "a photo of many {c}.",
    "a sculpture of a {c}.",
    "a photo of the hard to see {c}.",
    "a low resolution photo of the {c}.",
    "a rendering of a {c}.",
    "graffiti of a {c}.",
    "a bad photo of the {c}.",
    "a cropped photo of the {c}.",
    "a tattoo of a {c}.",
    "the embroidered {c}.",
    "a photo of a hard to see {c}.",
    "a bright photo of a {c}.",
    "a photo of a clean {c}.",
    "a photo of a dirty {c}.",
    "a dark photo of the {c}.",
    "a drawing of a {c}.",
    "a photo of my {c}.",
    "the plastic {c}.",
    "a photo of the cool {c}.",
    "a close-up photo of a {c}.",
    "a black and white photo of the {c}.",
    "a painting of the {c}.",
    "a painting of a {c}.",
    "a pixelated photo of the {c}.",
    "a sculpture of the {c}.",
    "a bright photo of the {c}.",
    "a cropped photo of a {c}.",
    "a plastic {c}.",
    "a photo of the dirty {c}.",
    "a jpeg corrupted photo of a {c}.",
    "a blurry photo of the {c}.",
    "a photo of the {c}.",
    "a good photo of the {c}.",
    "a rendering of the {c}.",
    "a {c} in a video game.",
    "a photo of one {c}.",
    "a doodle of a {c}.",
    "a close-up photo of the {c}.",
    "a photo of a {c}.",
    "the origami {c}.",
    "the {c} in a video game.",
    "a sketch of a {c}.",
    "a doodle of the {c}.",
    "a origami {c}.",
    "a low resolution photo of a {c}.",
    "the toy {c}.",
    "a rendition of the {c}.",
    "a photo of the clean {c}.",
    "a photo of a large {c}.",
    "a rendition of a {c}.",
    "a photo of a nice {c}.",
    "a photo of a weird {c}.",
    "a blurry photo of a {c}.",
    "a cartoon {c}.",
    "art of a {c}.",
    "a sketch of the {c}.",
    "a embroidered {c}.",
    "a pixelated photo of a {c}.",
    "itap of the {c}.",
    "a jpeg corrupted photo of the {c}.",
    "a good photo of a {c}.",
    "a plushie {c}.",
    "a photo of the nice {c}.",
    "a photo of the small {c}.",
    "a photo of the weird {c}.",
    "the cartoon {c}.",
    "art of the {c}.",
    "a drawing of the {c}.",
    "a photo of the large {c}.",
    "a black and white photo of a {c}.",
    "the plushie {c}.",
    "a dark photo of a {c}.",
    "itap of a {c}.",
    "graffiti of the {c}.",
    "a toy {c}.",
    "itap of my {c}.",
    "a photo of a cool {c}.",
    "a photo of a small {c}.",
    "a tattoo of the {c}.",
)


def _check_template(template: str, where: str) -> str:
    template = template.replace("{}", "{c}")  # CLIP's notebook writes {}; CLIP_benchmark {c}
    try:
        filled = template.format(c="x")
    except (KeyError, IndexError, ValueError):
        filled = None
    if filled is None or "{c}" not in template:
        raise MmretError(f"{where}: a template needs {{c}} (or {{}}) where the class name goes, and no other "
                         f"braces; got {template!r}")
    return template


def load_templates(path: Path | None) -> list[str] | dict[str, list[str]]:
    """The prompts to use: CLIP's ImageNet set, or a file of your own.

    A `.txt` file holds one template per line; a `.json` file a list of templates, or an object
    that gives each class (by its label) prompts of its own, as CLIP_benchmark's
    `--custom_template_file` does for CuPL prompts.
    """
    if path is None:
        return list(IMAGENET_TEMPLATES)
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise MmretError(f"cannot read --templates {path}: {getattr(e, 'strerror', None) or e}") from None
    if path.suffix.lower() != ".json":
        lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
        if not lines:
            raise MmretError(f"--templates {path} holds no templates: write one per line, e.g. 'a photo of a {{c}}.'")
        return [_check_template(line, f"{path.name} line {n}") for n, line in enumerate(lines, 1)]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise MmretError(f"--templates {path} is not valid JSON: {e}") from None
    if isinstance(data, list) and data and all(isinstance(t, str) for t in data):
        return [_check_template(t, path.name) for t in data]
    if isinstance(data, dict) and data and all(isinstance(v, list) and v and all(isinstance(p, str) for p in v)
                                               for v in data.values()):
        return {str(k): list(v) for k, v in data.items()}
    raise MmretError(f"--templates {path} must hold a list of templates, or an object mapping each class "
                     "to a non-empty list of prompts")


def dataset_templates(lines: list[str], dataset: str) -> list[str]:
    """The templates a CLIP_benchmark set ships (its zeroshot_classification_templates.txt), checked."""
    return [_check_template(line, f"dataset {dataset!r}'s zeroshot_classification_templates.txt line {n} (pass "
                                  "--templates to use others)") for n, line in enumerate(lines, 1)]


def class_prompts(labels: list[str], names: list[str], templates: list[str] | dict[str, list[str]]) -> list[list[str]]:
    """The prompts of each class: every template filled with its name, or its own prompts."""
    if isinstance(templates, dict):
        missing = [label for label in labels if label not in templates]
        if missing:
            raise MmretError(f"--templates gives no prompts for {len(missing)} classes: {', '.join(missing[:5])}; "
                             "its keys must be the dataset's labels")
        return [templates[label] for label in labels]
    return [[t.format(c=name) for t in templates] for name in names]
