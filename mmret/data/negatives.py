"""Which pairs of a batch are right, and batches in which near-duplicates meet (hard negatives).

Captions shared by pictures: "A flower." under six Tux Paint pictures, an artist's e-mail address
under seventy openclipart drawings. `caption_keys` gives captions with the same text (case, spaces
and final punctuation aside) the same key; `batch_positives` marks, for a batch of (item, caption)
pairs, every pair whose caption is also one of the item's own texts. The loss then treats those as
right (`mmret.training.losses`), never as each other's negatives.

Hard-negative batches (`hard_negative_batches`): a contrastive batch of random pairs is mostly easy
negatives (a flag against a frying pan); the gradient comes from the few that look alike. Each epoch
the items are cut into groups of `group` near neighbours, mined once from the frozen towers' cached
features (`mine_neighbours`, cosine similarity, pictures that share a caption text left out since
they are positives), and whole groups are packed into batches. The groups change every epoch (the
anchors come in a new seeded order), the number and sizes of batches are those of `epoch_batches`,
and the whole plan is a pure function of (features, seed, epoch), so a resumed run continues exactly.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import torch

from mmret.errors import MmretError

Batch = tuple[np.ndarray, np.ndarray]  # (item indices, caption indices) into a source


def normalise_caption(text: str) -> str:
    """The text two captions must share to count as the same: lower case, single spaces, no final . ! ?"""
    return re.sub(r"\s+", " ", text.lower()).strip().rstrip(".!?;: ").strip()


def caption_keys(captions: list[str]) -> np.ndarray:
    """(M,) int64: equal for captions with the same normalised text."""
    codes, _ = pd.factorize(pd.Series([normalise_caption(c) for c in captions], dtype=object))
    return codes.astype(np.int64)


def batch_positives(items: np.ndarray, captions: np.ndarray, captions_of: list[np.ndarray],
                    keys: np.ndarray) -> torch.Tensor:
    """(B, B) bool: [i, j] when caption j of the batch has the text of one of item i's captions
    (the diagonal always does)."""
    batch_keys = keys[captions]  # (B,)
    return torch.from_numpy(np.stack([np.isin(batch_keys, keys[captions_of[i]]) for i in items]))


def shared_text_items(captions_of: list[np.ndarray], keys: np.ndarray) -> list[np.ndarray]:
    """For each item, the other items that have a caption of the same text."""
    by_key: dict[int, list[int]] = {}
    for item, caps in enumerate(captions_of):
        for k in set(keys[caps].tolist()):
            by_key.setdefault(k, []).append(item)
    out = []
    for item, caps in enumerate(captions_of):
        others = {j for k in set(keys[caps].tolist()) for j in by_key[k]} - {item}
        out.append(np.array(sorted(others), dtype=np.int64))
    return out


def mine_neighbours(features: np.ndarray | torch.Tensor, k: int, exclude: list[np.ndarray] | None = None,
                    block: int = 2048) -> np.ndarray:
    """(N, k) int64: each row's k most cosine-similar other rows, most similar first, never itself
    nor the rows in `exclude[i]` (a row with fewer candidates is padded with -1).

    Block by block, so N x N similarities are never held at once.
    """
    x = torch.nn.functional.normalize(torch.as_tensor(np.asarray(features, dtype=np.float32)), dim=1)
    n = len(x)
    if k < 1:
        raise MmretError(f"neighbours to mine must be at least 1, got {k}")
    k_eff = min(k, n - 1)
    out = np.full((n, k), -1, dtype=np.int64)
    if k_eff < 1:
        return out
    for a in range(0, n, block):
        b = min(a + block, n)
        sims = x[a:b] @ x.T  # (c, N)
        rows = torch.arange(b - a)
        sims[rows, rows + a] = -torch.inf
        if exclude is not None:
            for r in range(a, b):
                if len(exclude[r]):
                    sims[r - a, torch.from_numpy(exclude[r])] = -torch.inf
        top = sims.topk(k_eff, dim=1)
        idx = top.indices.numpy()
        idx[~torch.isfinite(top.values).numpy()] = -1
        out[a:b, :k_eff] = idx
    return out


def neighbour_groups(neighbours: np.ndarray, group: int, order: np.ndarray) -> list[np.ndarray]:
    """Cut the items into groups: each unplaced anchor, in `order`, takes its nearest still unplaced
    neighbours until the group has `group` members (fewer when its neighbours are gone)."""
    placed = np.zeros(len(neighbours), dtype=bool)
    groups = []
    for anchor in order:
        if placed[anchor]:
            continue
        members = [int(anchor)]
        for j in neighbours[anchor]:
            if len(members) == group:
                break
            if j >= 0 and not placed[j] and j != anchor:
                members.append(int(j))
                placed[j] = True
        placed[anchor] = True
        groups.append(np.array(members, dtype=np.int64))
    return groups


def batch_sizes(n: int, batch_size: int, min_last: int = 2) -> list[int]:
    """The sizes of `epoch_batches`' batches: full ones, the rest last; a last one of fewer than
    `min_last` pairs joins the one before."""
    sizes = [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])
    if len(sizes) > 1 and sizes[-1] < min_last:
        last = sizes.pop()
        sizes[-1] += last
    return sizes


def pack_groups(groups: list[np.ndarray], sizes: list[int]) -> list[np.ndarray]:
    """Items of whole groups into batches of the given sizes: each group goes into the first batch
    with room for all of it; a group that fits nowhere whole fills the remaining gaps in order."""
    room = list(sizes)
    parts: list[list[np.ndarray]] = [[] for _ in sizes]
    leftovers = []
    for g in groups:
        slot = next((i for i, r in enumerate(room) if r >= len(g)), None)
        if slot is None:
            leftovers.append(g)
            continue
        parts[slot].append(g)
        room[slot] -= len(g)
    rest = np.concatenate(leftovers) if leftovers else np.zeros(0, dtype=np.int64)
    for i, r in enumerate(room):
        if r and len(rest):
            parts[i].append(rest[:r])
            rest = rest[r:]
    return [np.concatenate(p) if p else np.zeros(0, dtype=np.int64) for p in parts]


def hard_negative_batches(captions_of: list[np.ndarray], neighbours: np.ndarray, batch_size: int, group: int,
                          seed: int, epoch: int, min_last: int = 2) -> list[Batch]:
    """Every item once per epoch with one random caption of its own, as `epoch_batches`, but in
    groups of `group` mined near neighbours that always share a batch."""
    if group < 2:
        raise MmretError(f"--hard-negatives is the size of a group of neighbours (at least 2), got {group}")
    rng = np.random.default_rng([seed, epoch, 1])
    order = rng.permutation(len(captions_of))
    picks = np.array([caps[rng.integers(len(caps))] for caps in captions_of], dtype=np.int64)
    groups = neighbour_groups(neighbours, group, order)
    groups = [groups[i] for i in rng.permutation(len(groups))]
    batches = pack_groups(groups, batch_sizes(len(captions_of), batch_size, min_last))
    return [(b, picks[b]) for b in batches]
