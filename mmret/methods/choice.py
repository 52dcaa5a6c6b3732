"""The method `mmret train` uses when no setting names one: a rule over what is known of the
hardware and the data, written from the measurements in docs/results, and the one line that
says what it chose and why.

The evidence so far (docs/results/retrieval.md, compositional.md):
- On captions that are mostly short titles (Tux Paint, openclipart) no costlier method beats
  `heads` beyond the folds' spread, and the querying bridge takes 10-40x its training time. So
  there the rule picks heads, on a CPU and on a GPU alike; what differs is the reason it gives.
- On captions that say where one thing is relative to another ("a dog to the left of a cat": those
  `mmret.data.composition.swap_objects` rewrites), the bridge trained with `--caption-negatives
  swap,relation` beat heads on the relations set (text->image R@1 0.62 against 0.51 over 5 seeds,
  swap_obj 0.84 against 0.63), where the bridge without them did not (0.52); on the shapes example
  both bridges were ahead of heads on 4 of 5 folds (+0.036 and +0.033 R@1, about one paired std).
  So the rule that picks the bridge there turns wrong captions on too, with the settings measured
  there (`RELATIONAL_SETTINGS`). Its signal is the share of the dataset's captions the swap rule can
  rewrite: 100% on the relations set, 80% on the example, 1 of 538 on Tux Paint, 8 of 3,346 on
  openclipart; `RELATIONAL` is the share from which the rule takes the bridge.

`Signals` is everything the rule sees; `signals` fills it. A new signal is one field of `Signals`,
filled in `signals` from the prepared dataset, and read in `choose_method`; nothing else changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmret.errors import MmretError

EVIDENCE = "docs/results"  # where the measurements the rule stands on are written up
RELATIONAL = 0.5  # share of captions naming a relation from which the bridge with wrong captions is chosen
RELATIONAL_SETTINGS = {"caption_negatives": "swap,relation", "queries": 8, "bridge_width": 192, "token_pool": 2,
                       "lr": 0.001}  # the bridge as measured on the relations set
_SAMPLE = 2000  # captions read for the share (evenly spaced): enough to tell 50% from 1%


@dataclass(frozen=True)
class Signals:
    """What the rule sees."""

    device: str  # cpu | cuda: where training will run (or, for a memory plan, the GPU planned for)
    model: bool = False  # --model names a CLIP whose towers a tower method adapts
    asked: tuple[str, ...] = ()  # the methods that have every method setting given (empty: none given)
    asked_by: str = ""  # one such setting, as an option (--queries), for the line that says why
    dataset: str | None = None  # the prepared dataset (None: not prepared yet)
    captions: int = 0  # its captions, all splits
    relational: float = 0.0  # share of them that say where one thing is relative to another


@dataclass(frozen=True)
class Choice:
    method: str
    why: str
    signals: Signals
    settings: dict[str, Any] = field(default_factory=dict)  # settings the rule turns on with the method

    def line(self) -> str:
        s = self.signals
        data = f" for the {s.captions:,} captions of {s.dataset}" if s.dataset else ""
        given = "".join(f" --{k.replace('_', '-')} {v}" for k, v in self.settings.items())
        given = f" with{given}" if given else ""
        return f"method: {self.method}{given}{data} on {s.device}, chosen because {self.why} (--method picks another)"


def choose_method(s: Signals) -> Choice:
    """The method for `s` (see the module's docstring for the evidence)."""
    if s.model:
        return Choice("lora", "--model names a CLIP whose towers lora adapts", s)
    if s.asked and "heads" not in s.asked:
        return Choice(s.asked[0], f"{s.asked_by} is a setting of {' and '.join(s.asked)}", s)
    if s.relational >= RELATIONAL and (not s.asked or "bridge" in s.asked):
        why = (f"{s.relational:.0%} of its captions say where one thing is relative to another, and on such "
               f"captions the bridge with wrong captions beat heads (text->image R@1 0.62 against 0.51, {EVIDENCE}); "
               f"it trains 3-40x longer than heads")
        return Choice("bridge", why, s, dict(RELATIONAL_SETTINGS))
    if s.device == "cpu":
        why = (f"heads train 10-40x faster than bridge on a CPU, and bridge has not beaten them beyond noise on "
               f"any dataset measured ({EVIDENCE})")
    else:
        why = f"bridge has not beaten heads beyond noise on any dataset measured, at 10-40x the cost ({EVIDENCE})"
    return Choice("heads", why, s)


def signals(named: dict[str, Any], target: str | None = None) -> Signals:
    """The signals of a run whose settings `named` gives (None or missing: the default). `target`
    is the device planned for, when that is not where this process would train (a memory plan for
    a GPU); by default the device `--device` picks on this machine."""
    from mmret.methods.catalog import method_configs, owners
    from mmret.methods.config import MethodConfig

    shared = {f for f in MethodConfig.__dataclass_fields__}
    own = [k for k, v in named.items() if v is not None and k not in shared and k in _method_settings(method_configs())]
    asked: tuple[str, ...] = ()
    if own:
        sets = [set(owners(k)) for k in own]
        asked = tuple(m for m in method_configs() if all(m in s for s in sets))
    dataset, captions, relational = _dataset(named.get("dataset") or "example", named.get("data_dir"))
    return Signals(device=target or _device(named.get("device") or "auto"), model=bool(named.get("model")),
                   asked=asked, asked_by="--" + own[0].replace("_", "-") if own else "", dataset=dataset,
                   captions=captions, relational=relational)


def _method_settings(configs: dict[str, type]) -> set[str]:
    return set().union(*(set(c.__dataclass_fields__) for c in configs.values()))


def _device(requested: str) -> str:
    from mmret.common.device import pick_device

    return pick_device(requested).type


def _dataset(name: str, data_dir: Path | None) -> tuple[str | None, int, float]:
    """(name, captions, share of captions naming a relation) of the prepared dataset."""
    from mmret.data.prepared import load_dataset

    try:
        ds = load_dataset(name, data_dir)
    except MmretError:  # not prepared yet: training will say so; the rule goes on without it
        return None, 0, 0.0
    return ds.name, len(ds.captions), relational_share(ds.captions["caption"].tolist())


def relational_share(captions: list[str]) -> float:
    """The share of `captions` (at most `_SAMPLE` of them, evenly spaced) that the swap rule
    rewrites: those that name an asymmetric relation between two things."""
    from mmret.data.composition import swap_objects

    step = max(1, len(captions) // _SAMPLE)
    sample = [c for c in captions[::step] if isinstance(c, str)]
    return sum(swap_objects(c) is not None for c in sample) / len(sample) if sample else 0.0
