"""Wrong captions that differ from a right one only in composition, for training with
`--caption-negatives` (NegCLIP's hard negatives, Yuksekgonul et al. 2023): the loss counts them
as negatives of their caption's item only, never as anyone's positive.

The rules, each a plain string rewrite (no model runs):

- `swap`: the two phrases around a relation change places. The caption is cut at its first
  relation phrase (`RELATIONS`, longest match, whole words, any case): "a red circle to the left of
  a blue square" -> "a blue square to the left of a red circle". A leading "there is", "a picture
  of" and the like (`LEADS`) stays in front. Symmetric relations ("next to") are not cut at: their
  swap says the same thing.
- `relation`: the relation is replaced by its opposite ("to the left of" -> "to the right of",
  "above" -> "below").
- `attribute`: the first attribute word (`ATTRIBUTES`: colours and sizes) of each side of a
  relation (or of "and", "with", "next to") changes places: "a red circle above a blue square" ->
  "a blue circle above a red square". Both sides need one, followed by a word it describes (in
  "a red and white flower" the two colours describe one thing), and they must differ.
- `table`: the wrong candidates the dataset itself holds (`candidates.parquet`, from `mmret prepare
  sugar-crepe` or `winoground`): for a caption that is an example's right caption for its item,
  the example's captions that are right for no item (SugarCrepe's negative captions).

A rule that does not apply to a caption gives nothing; a rewrite equal to one of the item's own
captions (case, spaces and final punctuation aside) is dropped, so a negative is never a right
answer. The texts are plain captions: features methods cache them like captions (see
`mmret.features`).
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from mmret.data.negatives import normalise_caption

# asymmetric relations and their opposites (both ways)
OPPOSITES = {
    "to the left of": "to the right of", "on the left of": "on the right of", "left of": "right of",
    "above": "below", "on top of": "underneath", "over": "under", "in front of": "behind",
    "inside": "outside",
}
RELATIONS = {**OPPOSITES, **{b: a for a, b in OPPOSITES.items()}}
JOINS = ("next to", "beside", "near", "and", "with")  # symmetric: attributes may swap across them, objects not
LEADS = ("there is", "there are", "a picture of", "a photo of", "an image of", "a drawing of")
ATTRIBUTES = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "grey",
              "gray", "golden", "silver", "small", "big", "large", "little", "tiny", "huge", "tall", "short")


def _find(caption: str, phrases: tuple[str, ...] | dict) -> re.Match | None:
    """The first phrase of `phrases` in `caption` as whole words; at one place the longest wins."""
    alternatives = "|".join(re.escape(p) for p in sorted(phrases, key=len, reverse=True))
    return re.search(rf"(?<![\w-])({alternatives})(?![\w-])", caption, flags=re.IGNORECASE)


def _parts(caption: str, phrases) -> tuple[str, str, str, str, str] | None:
    """(lead, left, relation as written, right, end) around the first of `phrases`, or None."""
    body = caption.strip()
    end = body[len(body.rstrip(".!?")):]
    body = body[:len(body) - len(end)]
    lead = ""
    match = re.match(rf"({'|'.join(re.escape(x) for x in LEADS)})\s+", body, flags=re.IGNORECASE)
    if match:
        lead, body = body[:match.end()], body[match.end():]
    found = _find(body, phrases)
    if found is None:
        return None
    left, right = body[:found.start()].strip(), body[found.end():].strip()
    return (lead, left, found.group(1), right, end) if left and right else None


def _sentence(lead: str, text: str, end: str, capital: bool) -> str:
    out = lead + text + end
    return out[:1].upper() + out[1:] if capital else out


def swap_objects(caption: str) -> str | None:
    """The phrases around the first asymmetric relation swapped (see the module docstring)."""
    parts = _parts(caption, RELATIONS)
    if parts is None:
        return None
    lead, left, rel, right, end = parts
    capital = caption.strip()[:1].isupper()
    if capital and not lead:  # the sentence's capital moves with its first word; the new first word takes one
        left = left[:1].lower() + left[1:]
    return _sentence(lead, f"{right} {rel} {left}", end, capital)


def replace_relation(caption: str) -> str | None:
    """The first asymmetric relation replaced by its opposite."""
    parts = _parts(caption, RELATIONS)
    if parts is None:
        return None
    lead, left, rel, right, end = parts
    opposite = RELATIONS[rel.lower()]
    return _sentence(lead, f"{left} {opposite} {right}", end, caption.strip()[:1].isupper())


def swap_attributes(caption: str) -> str | None:
    """The first attribute word of each side swapped, when both sides have one and they differ."""
    parts = _parts(caption, (*RELATIONS, *JOINS))
    if parts is None:
        return None
    lead, left, rel, right, end = parts
    a, b = _find(left, ATTRIBUTES), _find(right, ATTRIBUTES)
    if (a is None or b is None or a.group(1).lower() == b.group(1).lower() or not left[a.end():].strip()
            or not right[b.end():].strip()):
        return None
    left = left[:a.start()] + b.group(1) + left[a.end():]
    right = right[:b.start()] + a.group(1) + right[b.end():]
    return _sentence(lead, f"{left} {rel} {right}", end, caption.strip()[:1].isupper())


GENERATORS = {"swap": swap_objects, "relation": replace_relation, "attribute": swap_attributes}


def _table_negatives(captions: pd.DataFrame, candidates: pd.DataFrame | None) -> dict[int, list[str]]:
    """caption_id -> the wrong candidates of the examples in which that caption is its item's right one."""
    if candidates is None or candidates.empty:
        return {}
    right = candidates[candidates["item_id"].notna()]
    wrong = candidates[candidates["item_id"].isna()].groupby("example")["caption"].apply(list)
    by_key: dict[tuple[str, str], list[str]] = {}
    for item, text, example in zip(right["item_id"], right["caption"], right["example"]):
        by_key.setdefault((str(item), normalise_caption(text)), []).extend(wrong.get(example, []))
    return {int(cid): by_key.get((str(item), normalise_caption(text)), [])
            for cid, item, text in zip(captions["caption_id"], captions["item_id"], captions["caption"])}


def negative_table(captions: pd.DataFrame, rules: tuple[str, ...],
                   candidates: pd.DataFrame | None = None) -> pd.DataFrame:
    """The wrong captions of every caption under `rules`: caption_id (a new id per wrong caption, in
    order), of_caption (the caption_id it is wrong for), rule, caption, item_id and split (its
    caption's). `captions` is a caption table (caption_id, item_id, caption, split); `candidates`
    the dataset's candidate table, read by the `table` rule."""
    own: dict[str, set[str]] = {}
    for item, text in zip(captions["item_id"], captions["caption"]):
        own.setdefault(str(item), set()).add(normalise_caption(text))
    from_table = _table_negatives(captions, candidates) if "table" in rules else {}
    rows = []
    for cid, item, text, split in zip(captions["caption_id"], captions["item_id"], captions["caption"],
                                      captions["split"]):
        made: list[tuple[str, str]] = [(r, GENERATORS[r](text)) for r in rules if r in GENERATORS]
        made += [("table", t) for t in from_table.get(int(cid), [])]
        seen = set(own[str(item)])
        for rule, negative in made:
            key = normalise_caption(negative) if negative else ""
            if key and key not in seen:
                seen.add(key)
                rows.append((int(cid), rule, negative, item, split))
    table = pd.DataFrame(rows, columns=["of_caption", "rule", "caption", "item_id", "split"])
    table.insert(0, "caption_id", np.arange(len(table), dtype=np.int64))
    return table
