"""`mmret eval --task cross-modal`: items of one kind finding items of another through a space
(`mmret.runs.space`): sounds finding pictures and pictures finding sounds, with no text in between.

The queries are a split of one dataset, the candidates every item of another; each side is
embedded by the run of the space whose items are of its kind. A query's right candidates are
given by a pairs table (two columns: query item id, candidate item id) or, by default, share
its relative path without the ending (`animals/dog.ogg` and `animals/dog.png`). Both directions
are scored (Recall@k, MRR, median rank; bootstrap intervals; chance beside), and beside each a
caption chain, the route through text: the query's best caption among the candidates' own
captions, then the candidates nearest that caption.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from mmret.api import load
from mmret.common.io import write_json
from mmret.common.progress import NULL, Reporter
from mmret.data.prepared import load_dataset
from mmret.errors import MmretError
from mmret.metrics.pairs import KS, bootstrap_intervals, chance_metrics, pair_ranks, rank_metrics
from mmret.runs import load_run_config
from mmret.runs.space import anchor_of, space_member


@dataclass
class CrossModalRow:
    direction: str  # "audio → image"
    route: str  # direct | caption chain
    metrics: dict[str, float]
    ci: dict[str, tuple[float, float]] | None = None


@dataclass
class CrossModalResult:
    space: str  # the anchor's name
    queries: str  # dataset of the queries
    items: str  # dataset of the candidates
    split: str  # the queries' split (the candidates are every item)
    runs: dict[str, str]  # modality -> the run that embedded it
    sizes: dict[str, int]  # queries, items, pairs
    rows: list[CrossModalRow]
    chance: dict[str, dict[str, float]]  # direction -> chance metrics
    path: Path | None = field(default=None, repr=False)

    def to_json(self) -> dict:
        out = asdict(self)
        del out["path"]
        return out


def _pairs_by_path(q_ids: list[str], i_ids: list[str]) -> np.ndarray:
    stem = {}
    for j, item in enumerate(i_ids):
        stem.setdefault(str(Path(item).with_suffix("")), []).append(j)
    right = np.zeros((len(q_ids), len(i_ids)), dtype=bool)
    for q, item in enumerate(q_ids):
        right[q, stem.get(str(Path(item).with_suffix("")), [])] = True
    return right


def _pairs_from_table(path: Path, q_ids: list[str], i_ids: list[str]) -> np.ndarray:
    try:
        table = pd.read_csv(path, dtype=str)
    except (OSError, ValueError) as e:
        raise MmretError(f"cannot read --pairs {path}: {str(e).splitlines()[0]}") from None
    if table.shape[1] < 2:
        raise MmretError(f"--pairs {path} needs two columns: a query's item id and its candidate's item id")
    q_row, i_row = {k: n for n, k in enumerate(q_ids)}, {k: n for n, k in enumerate(i_ids)}
    right = np.zeros((len(q_ids), len(i_ids)), dtype=bool)
    for a, b in table.iloc[:, :2].itertuples(index=False):
        if a in q_row and b in i_row:
            right[q_row[a], i_row[b]] = True
    return right


def _chain_scores(queries: np.ndarray, captions: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Each query's best caption (among the candidates' captions), then every candidate's score with it."""
    best = (queries @ captions.T).argmax(axis=1)
    return captions[best] @ items.T


def _direction(name: str, scores: np.ndarray, chain: np.ndarray, right: np.ndarray, bootstrap: int,
               seed: int) -> tuple[list[CrossModalRow], dict[str, float], int]:
    keep = right.any(axis=1)
    rows = []
    for route, s in (("direct", scores), ("caption chain", chain)):
        ranks = pair_ranks(s[keep], right[keep])
        ci = bootstrap_intervals(ranks, bootstrap, seed, KS) if bootstrap else None
        rows.append(CrossModalRow(name, route, rank_metrics(ranks, KS), ci))
    return rows, chance_metrics(right.shape[1], right[keep].sum(axis=1), KS), int(keep.sum())


def evaluate_cross_modal(run_dir: Path, queries: str, items: str, *, pairs: Path | None = None, split: str = "test",
                         bootstrap: int = 0, seed: int = 0, which: str = "best", device: str = "auto",
                         reporter: Reporter = NULL, data_dir: Path | None = None) -> CrossModalResult:
    """Score the space of `run_dir` on queries (a split of one dataset) finding items (every item
    of another), both ways; saves `runs/<run>/eval/cross-<queries>-<split>-<items>.json`."""
    data_dir = data_dir or load_run_config(run_dir).data.data_dir
    ds_q, ds_i = load_dataset(queries, data_dir), load_dataset(items, data_dir)
    if ds_q.modality.name == ds_i.modality.name:
        raise MmretError(f"--task cross-modal pairs two kinds of items; {queries} and {items} both hold "
                         f"{ds_q.modality.plural} (score them with --task retrieval)")
    runs = {ds.modality.name: space_member(run_dir, ds.modality.name, ds.modality.plural) for ds in (ds_q, ds_i)}
    eq = load(runs[ds_q.modality.name], checkpoint=which, device=device).embed_split(
        queries, split, reporter=reporter, data_dir=data_dir)
    ei = load(runs[ds_i.modality.name], checkpoint=which, device=device).embed_split(
        items, "all", reporter=reporter, data_dir=data_dir)
    q_ids, i_ids = eq.item_table["item_id"].astype(str).tolist(), ei.item_table["item_id"].astype(str).tolist()
    right = _pairs_from_table(pairs, q_ids, i_ids) if pairs is not None else _pairs_by_path(q_ids, i_ids)
    if not right.any():
        raise MmretError(f"no item of {queries} {split} has a partner in {items}: "
                         + ("check the ids in --pairs" if pairs is not None else
                            "pair them by a --pairs table, or give both the same relative paths"))
    q, i = (np.asarray(e.items, dtype=np.float32) for e in (eq, ei))
    qc, ic = (np.asarray(e.captions, dtype=np.float32) for e in (eq, ei))
    a, b = ds_q.modality.name, ds_i.modality.name
    forward, chance_f, n_q = _direction(f"{a} → {b}", q @ i.T, _chain_scores(q, ic, i), right, bootstrap, seed)
    backward, chance_b, n_i = _direction(f"{b} → {a}", i @ q.T, _chain_scores(i, qc, q), right.T, bootstrap, seed)
    result = CrossModalResult(anchor_of(run_dir), queries, items, split, {k: v.name for k, v in runs.items()},
                              {"queries": n_q, "items": n_i, "pairs": int(right.sum()), "candidates": len(i_ids)},
                              forward + backward, {f"{a} → {b}": chance_f, f"{b} → {a}": chance_b})
    result.path = Path(run_dir) / "eval" / f"cross-{queries}-{split}-{items}.json"
    write_json(result.path, {**result.to_json(), "which": which,
                             "created": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    return result
