"""The method `mmret train` uses when no setting names one: a rule over what is known of the
hardware and the data, written from the measurements in docs/results, and the one line that
says what it chose and why.

The evidence so far: on every real dataset measured (Tux Paint, openclipart; captions that are
mostly short titles) no costlier method beats `heads` beyond the folds' spread, and the querying
bridge takes 10-40x its training time (about 115 pairs/s against 7-9 on a 2-core CPU). So the rule
picks heads on a CPU and on a GPU alike; what differs is the reason it gives.

`Signals` is everything the rule sees; `signals` fills it. A new signal (say, the share of captions
that name spatial relations, "a dog to the left of a cat", should the bridge be measured to win
there) is one field of `Signals`, filled in `signals` from the prepared dataset, and read in
`choose_method`; nothing else changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmret.errors import MmretError

EVIDENCE = "docs/results"  # where the measurements the rule stands on are written up


@dataclass(frozen=True)
class Signals:
    """What the rule sees."""

    device: str  # cpu | cuda: where training will run (or, for a memory plan, the GPU planned for)
    model: bool = False  # --model names a CLIP whose towers a tower method adapts
    asked: tuple[str, ...] = ()  # the methods that have every method setting given (empty: none given)
    asked_by: str = ""  # one such setting, as an option (--queries), for the line that says why
    dataset: str | None = None  # the prepared dataset (None: not prepared yet)
    captions: int = 0  # its captions, all splits


@dataclass(frozen=True)
class Choice:
    method: str
    why: str
    signals: Signals

    def line(self) -> str:
        s = self.signals
        data = f" for the {s.captions:,} captions of {s.dataset}" if s.dataset else ""
        return f"method: {self.method}{data} on {s.device}, chosen because {self.why} (--method picks another)"


def choose_method(s: Signals) -> Choice:
    """The method for `s` (see the module's docstring for the evidence)."""
    if s.model:
        return Choice("lora", "--model names a CLIP whose towers lora adapts", s)
    if s.asked and "heads" not in s.asked:
        return Choice(s.asked[0], f"{s.asked_by} is a setting of {' and '.join(s.asked)}", s)
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
    dataset, captions = _dataset(named.get("dataset") or "example", named.get("data_dir"))
    return Signals(device=target or _device(named.get("device") or "auto"), model=bool(named.get("model")),
                   asked=asked, asked_by="--" + own[0].replace("_", "-") if own else "", dataset=dataset,
                   captions=captions)


def _method_settings(configs: dict[str, type]) -> set[str]:
    return set().union(*(set(c.__dataclass_fields__) for c in configs.values()))


def _device(requested: str) -> str:
    from mmret.common.device import pick_device

    return pick_device(requested).type


def _dataset(name: str, data_dir: Path | None) -> tuple[str | None, int]:
    from mmret.data.prepared import load_dataset

    try:
        ds = load_dataset(name, data_dir)
    except MmretError:  # not prepared yet: training will say so; the rule goes on without it
        return None, 0
    return ds.name, len(ds.captions)
