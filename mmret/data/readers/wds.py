"""webdataset shards as img2dataset writes them and open_clip reads them: `.tar` files of
`key.jpg|png|webp` (any item ending of a registered modality) + `key.txt` (the caption), with an
optional `key.json` (img2dataset's metadata; its "caption" serves when `key.txt` is missing, and its
other fields, the source `url` among them, are kept in the item table as `source_<field>`).

`--root` is a shard pattern with braces, `shards/{00000..00099}.tar` (or one `.tar`). The shards
are read with the `webdataset` package, one shard per DataLoader worker (never more workers than
shards, the known trap where a worker without a shard waits or fails); each worker reads the
item's size from the bytes in hand and sends back only the record. Nothing is unpacked: the
table addresses each item as `<shard>::<member>` relative to the shards' folder, and training
and encoding read the member in place (`mmret.common.items`). A member that does not decode is
reported and left out, and so is an item without a caption (a shard with no captions leaves all
of its items out, each reported). Splits are seeded fractions (`--val`, `--test`).
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

from mmret.common.items import MemberError, member_address, shard_index
from mmret.common.paths import Roots
from mmret.data.readers.base import ItemRecord, Problem, SourceData, decode_text
from mmret.errors import MmretError, printable
from mmret.modalities import MODALITIES, ItemError


def _webdataset() -> Any:
    try:
        import webdataset
    except ImportError:
        raise MmretError("prepare wds needs the webdataset package: pip install -e '.[wds]'") from None
    return webdataset


MAX_SHARDS = 100_000  # shards one pattern may name: counted before anything is expanded
_RANGE = re.compile(r"^(-?\d+|[a-zA-Z])\.\.(-?\d+|[a-zA-Z])(?:\.\.(-?\d+))?$")


def _group_end(pattern: str, start: int) -> int:
    """The index of the brace closing the one at `start` (-1 if none)."""
    depth, i = 0, start
    while i < len(pattern):
        depth += {"{": 1, "}": -1}.get(pattern[i], 0)
        if depth == 0:
            return i
        i += 2 if pattern[i] == "\\" else 1
    return -1


def brace_count(pattern: str) -> int:
    """How many names a brace pattern expands to (`{a..b}`, `{a..b..step}`, `{x,y}`, nested), by
    arithmetic: braceexpand builds every name of a range in memory before giving the first."""
    total, i = 1, 0
    while i < len(pattern):
        end = _group_end(pattern, i) if pattern[i] == "{" else -1
        if end < 0:
            i += 2 if pattern[i] == "\\" else 1
            continue
        body, i = pattern[i + 1:end], end + 1
        ranged = _RANGE.match(body)
        if ranged:
            a, b, step = ranged.groups()
            lo, hi = (int(a), int(b)) if a.lstrip("-").isdigit() else (ord(a), ord(b))
            total *= abs(hi - lo) // max(1, abs(int(step or 1))) + 1
            continue
        parts, depth, last = [], 0, 0
        for j, ch in enumerate(body):
            depth += {"{": 1, "}": -1}.get(ch, 0)
            if ch == "," and depth == 0:
                parts.append(body[last:j])
                last = j + 1
        total *= sum(brace_count(part) for part in parts + [body[last:]]) if parts else brace_count(body)
    return total


def shard_urls(pattern: str) -> list[str]:
    """The shard files of a brace pattern (webdataset's own expansion, once the count is known to be
    within `MAX_SHARDS`), each of which must exist; real paths, so the shards are read where they are."""
    expand_urls = _webdataset().shardlists.expand_urls

    count = brace_count(str(pattern))
    if count > MAX_SHARDS:
        raise MmretError(f"--root {printable(str(pattern))} names {count:,} shards; mmret reads at most "
                         f"{MAX_SHARDS:,} from one pattern: check the braces, e.g. 'shards/{{00000..00099}}.tar'")
    try:
        urls = expand_urls(str(pattern))
    except ValueError as e:  # braceexpand's UnbalancedBracesError
        raise MmretError(f"--root {printable(str(pattern))} is not a brace pattern webdataset reads: {e}") from None
    missing = [u for u in urls if not os.path.isfile(u)]
    if missing:
        raise MmretError(f"{len(missing)} of {len(urls)} shards of {pattern} do not exist (first: {missing[0]}); "
                         "check the pattern, e.g. 'shards/{00000..00099}.tar'")
    return [os.path.realpath(u) for u in urls]


def duplicate_key(first_url: str, url: str) -> str:
    """The problem line of a sample whose key was read before (in this shard, or in an earlier one)."""
    if first_url == url:
        return "this shard holds the key twice; kept the first"
    return f"{os.path.basename(first_url)} holds this key already; kept that one"


def _every_shard(src: Iterator) -> Iterator:
    """No split across machines: `prepare` reads every shard (its workers split them)."""
    yield from src


def _item(sample: dict) -> tuple[str, str, bytes] | None:
    """(modality, file ending, bytes) of the sample's item, if it has one."""
    for modality in MODALITIES.values():
        for ending in modality.extensions:
            data = sample.get(ending.lstrip("."))
            if data is not None:
                return modality.name, ending.lstrip("."), data
    return None


def _caption(sample: dict, where: str, problems: list[dict]) -> str | None:
    if sample.get("txt") is not None:
        found: list[Problem] = []
        text = decode_text(sample["txt"], where, found)
        problems += [p.__dict__ for p in found]
        return text
    if sample.get("json") is not None:
        try:
            caption = json.loads(sample["json"]).get("caption")
        except (ValueError, AttributeError):
            caption = None
        if isinstance(caption, str):
            return caption
    return None


def _label(sample: dict, where: str, problems: list[dict]) -> int | None:
    """A CLIP_benchmark classification sample's `cls`: the class's index in classnames.txt."""
    raw = sample.get("cls")
    if raw is None:
        problems.append({"kind": "no label", "item": where, "reason": "no .cls beside it"})
        return None
    text = raw.decode("ascii", errors="replace").strip()
    if not text.isdigit():
        problems.append({"kind": "bad label", "item": where, "reason": f"cls is not a class index: {text[:20]!r}"})
        return None
    return int(text)


def summarize(sample: dict, full: bool = False, labels: bool = False) -> dict:
    """What `prepare` keeps of one sample (run in a DataLoader worker): its key, shard, member,
    modality, probed columns and captions (with `labels`: its class index instead), or the
    problem that leaves it out."""
    key, url = sample["__key__"], sample["__url__"]
    out: dict[str, Any] = {"key": key, "url": url, "problems": []}
    found = _item(sample)
    if found is None:
        out["problems"].append({"kind": "no item", "item": f"{url}::{key}", "reason": "no picture (or other item) file"})
        return out
    modality, ending, data = found
    member = f"{key}.{ending}"
    where = f"{url}::{member}"
    out.update(modality=modality, member=member)
    try:
        out["columns"] = MODALITIES[modality].probe(io.BytesIO(data), full)
    except ItemError as e:
        out["problems"].append({"kind": f"broken {modality}", "item": where, "reason": str(e)})
        return out
    if labels:
        label = _label(sample, where, out["problems"])
        if label is not None:
            out["label"] = label
        return out
    caption = _caption(sample, where, out["problems"])
    if caption is None:
        out["problems"].append({"kind": "no caption", "item": where, "reason": "no .txt (or json caption) beside it"})
        return out
    out["captions"] = [line for line in caption.splitlines() if line.strip()]
    out["source"] = _source(sample)
    return out


def _source(sample: dict) -> dict | None:
    """The sample's `.json` fields but its caption (img2dataset's url, key, sha256, original size,
    status and the input's extra columns), kept beside the item in the table."""
    try:
        fields = json.loads(sample["json"]) if sample.get("json") is not None else None
    except ValueError:
        return None
    return {k: v for k, v in fields.items() if k != "caption"} if isinstance(fields, dict) else None


def _skip(exn: Exception) -> bool:
    """webdataset's handler: a sample it cannot read is skipped, said in the debug log (shards that
    are no readable tar were reported and left out before reading, by `readable_shards`)."""
    import logging

    logging.getLogger(__name__).debug("webdataset skipped a sample: %s", exn)
    return True


def readable_shards(urls: list[str], roots: Roots, problems: list[Problem]) -> list[str]:
    """The shards that are readable uncompressed tars inside `roots`; each other one is a problem line."""
    good = []
    for url in urls:
        try:
            shard_index(url, roots)
            good.append(url)
        except MemberError as e:
            problems.append(Problem("unreadable shard", url, f"{e}; left out"))
    return good


def read_samples(urls: list[str], full: bool, workers: int, labels: bool = False) -> Iterator[dict]:
    """Every sample's summary, the shards read in DataLoader workers (at most one per shard)."""
    import functools

    import torch

    wds = _webdataset()
    data = wds.WebDataset(urls, shardshuffle=False, nodesplitter=_every_shard, empty_check=False,
                          handler=_skip).map(functools.partial(summarize, full=full, labels=labels))
    workers = min(workers, len(urls))
    yield from torch.utils.data.DataLoader(data, batch_size=None, num_workers=workers)


def read_wds(root: Path, cfg) -> SourceData:
    """img2dataset shards from a brace pattern (`mmret prepare wds` registers it in
    `wds_benchmark`, beside CLIP_benchmark's folders)."""
    from mmret.common.device import default_workers

    import torch

    found = shard_urls(str(root))
    base = os.path.commonpath([os.path.dirname(u) for u in found])
    problems: list[Problem] = []
    urls = readable_shards(found, Roots.of(base), problems)
    if not urls:
        raise MmretError(f"none of the {len(found)} shards of {printable(str(root))} is a readable tar: "
                         f"{problems[0].reason}")
    records, seen, kinds = [], {}, set()
    for s in read_samples(urls, cfg.check_items, default_workers(torch.device("cpu"))):
        problems += [Problem(**p) for p in s["problems"]]
        if "captions" not in s:
            continue
        if s["key"] in seen:
            problems.append(Problem("duplicate key", f"{s['url']}::{s['member']}", duplicate_key(seen[s["key"]],
                                                                                                 s["url"])))
            continue
        seen[s["key"]] = s["url"]
        kinds.add(s["modality"])
        address = member_address(os.path.relpath(s["url"], base), s["member"])
        records.append(ItemRecord(s["key"], address, s["captions"], columns=s["columns"], source=s.get("source")))
    if len(kinds) > 1:
        raise MmretError(f"the shards hold {' and '.join(sorted(kinds))} items; prepare each kind from shards of its own")
    note = f"seeded random split (seed {cfg.seed}): val {cfg.val:g}, test {cfg.test:g} of the items"
    return SourceData(records, [f"{len(urls)} shards"], note, split_sizes=(cfg.val, cfg.test), problems=problems,
                      modality=kinds.pop() if kinds else "image", item_root=base)
