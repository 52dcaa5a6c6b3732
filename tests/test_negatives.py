"""Captions shared by pictures (never each other's negatives) and hard-negative batches (mined
neighbours share a batch), from the pure functions up to a training run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmret import training
from mmret.data.negatives import (
    batch_positives,
    batch_sizes,
    caption_keys,
    hard_negative_batches,
    mine_neighbours,
    neighbour_groups,
    normalise_caption,
    shared_text_items,
)
from mmret.data.pairs import epoch_batches, group_captions
from mmret.errors import MmretError
from mmret.runs import RunConfig, with_overrides


def test_caption_keys_ignore_case_spaces_and_the_final_full_stop():
    keys = caption_keys(["A flower.", "a  flower", "A flower!", "a rose.", "A Flower"])
    assert keys[0] == keys[1] == keys[2] == keys[4] != keys[3]
    assert normalise_caption("  Down at the docks.  ") == "down at the docks"


def test_batch_positives_mark_every_item_that_has_the_caption_text():
    captions = ["A flower.", "a flower", "A rose.", "A tulip.", "a rose"]
    caption_item = np.array([0, 1, 2, 2, 3])  # item 2 has "A rose." and "A tulip."; item 3 "a rose"
    captions_of = group_captions(caption_item, 4)
    keys = caption_keys(captions)
    pos = batch_positives(np.array([0, 1, 2, 3]), np.array([0, 1, 3, 4]), captions_of, keys)
    expected = torch.tensor([[1, 1, 0, 0],
                             [1, 1, 0, 0],
                             [0, 0, 1, 1],   # item 2 also has the text of item 3's caption "a rose"
                             [0, 0, 0, 1]], dtype=torch.bool)  # item 3 does not have "A tulip."
    assert torch.equal(pos, expected)
    assert shared_text_items(captions_of, keys)[2].tolist() == [3]


def clustered(n_clusters: int, size: int, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Features in tight clusters (far apart), and the cluster of each row, in shuffled order."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, dim)) * 10
    labels = rng.permutation(np.repeat(np.arange(n_clusters), size))
    return centres[labels] + rng.normal(size=(len(labels), dim)) * 0.1, labels


def test_mined_neighbours_are_the_nearest_and_leave_out_self_and_excluded_rows():
    x, labels = clustered(6, 4)
    nb = mine_neighbours(x, 3, block=5)  # blocks smaller than the data
    for i, row in enumerate(nb):
        assert i not in row and (labels[row] == labels[i]).all()
    exclude = [np.array([j for j in np.flatnonzero(labels == labels[i]) if j != i][:1]) for i in range(len(x))]
    nb = mine_neighbours(x, 3, exclude)
    assert all(exclude[i][0] not in nb[i] for i in range(len(x)))
    assert (mine_neighbours(x[:2], 3)[:, 1:] == -1).all()  # fewer candidates than asked: padded


def test_groups_take_the_nearest_free_neighbours():
    neighbours = np.array([[1, 2, 3], [0, 2, 3], [3, 0, 1], [2, 1, 0], [0, 1, 2]])
    groups = neighbour_groups(neighbours, 2, np.array([0, 2, 4, 1, 3]))
    assert [g.tolist() for g in groups] == [[0, 1], [2, 3], [4]]  # 4's neighbours are all taken


@pytest.mark.parametrize("epoch", [0, 1, 2])
def test_hard_negative_batches_contain_the_mined_neighbours(epoch):
    x, labels = clustered(24, 4)  # 96 items, 24 clusters of 4
    captions_of = [np.array([i]) for i in range(len(x))]
    nb = mine_neighbours(x, 8)
    batches = hard_negative_batches(captions_of, nb, 16, 4, seed=0, epoch=epoch)
    items = np.concatenate([b for b, _ in batches])
    assert sorted(items.tolist()) == list(range(96))  # every item once
    assert [len(b) for b, _ in batches] == [len(b) for b, _ in epoch_batches(captions_of, 16, 0, epoch)]
    for b, caps in batches:
        assert (caps == b).all()  # each item with its own caption
        for i in b:  # each item's three mined nearest neighbours (its cluster) are in its batch
            assert set(nb[i, :3].tolist()) <= set(b.tolist())
    random = epoch_batches(captions_of, 16, 0, epoch)
    together = sum(len(set(np.flatnonzero(labels == labels[i])) & set(b.tolist())) for b, _ in random for i in b)
    assert together < 96 * 2  # random batches break clusters up (4 * 96 if they kept them)


def test_hard_negative_batches_change_every_epoch_and_repeat_for_a_seed():
    x, _ = clustered(10, 5)
    captions_of = [np.array([2 * i, 2 * i + 1]) for i in range(len(x))]
    nb = mine_neighbours(x, 8)
    a = hard_negative_batches(captions_of, nb, 8, 3, seed=0, epoch=0)
    again = hard_negative_batches(captions_of, nb, 8, 3, seed=0, epoch=0)
    other = hard_negative_batches(captions_of, nb, 8, 3, seed=0, epoch=1)
    assert all(np.array_equal(p[0], q[0]) and np.array_equal(p[1], q[1]) for p, q in zip(a, again))
    assert not all(np.array_equal(p[0], q[0]) for p, q in zip(a, other))
    assert batch_sizes(50, 8) == [8] * 6 + [2] and batch_sizes(49, 8) == [8] * 5 + [9]
    with pytest.raises(MmretError, match="at least 2"):
        hard_negative_batches(captions_of, nb, 8, 1, seed=0, epoch=0)


# --- through training ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tiny_world):
    return tiny_world


def config(world, tmp_path, **options) -> RunConfig:
    base = dict(dataset="example", item=world["vit"], text=world["bert"], data_dir=world["root"] / "data",
                runs_dir=tmp_path / "runs", epochs=2, batch_size=16, lr=5e-3, embed_dim=16, patience=0,
                method="heads")
    return with_overrides(RunConfig(), {**base, **options})


def test_a_run_with_hard_negatives_batches_the_mined_neighbours(world, tmp_path):
    s = training.setup(config(world, tmp_path, hard_negatives=4, name="hn"))
    assert s.plan.neighbours is not None and s.plan.neighbours.shape == (s.train.num_items, 16)
    batches = s.plan.batches(0)
    assert len(batches) == s.steps_per_epoch == len(epoch_batches(s.train.tables.captions_of, 16, 0, 0))
    where = {int(i): k for k, (b, _) in enumerate(batches) for i in b}
    # the first member of each group is its anchor: at least the nearest free neighbour follows it
    hits = sum(where[int(i)] == where[int(s.plan.neighbours[i, 0])] for i in range(s.train.num_items))
    assert hits >= s.train.num_items // 2  # random batches of 16 out of 48 would give about a third
    result = training.train(config(world, tmp_path, hard_negatives=4, hn_beta=0.5, name="hn-run"))
    assert np.isfinite(result.last["train_loss"])


def test_captions_shared_by_pictures_are_never_each_others_negatives(world, tmp_path):
    """Every batch the loss sees marks each pair whose caption texts match as right; with
    --same-caption negative none are."""
    seen = []

    def spy(item_emb, text_emb, scale, positives=None):
        seen.append(positives)
        from mmret.training.losses import ClipLoss
        return ClipLoss()(item_emb, text_emb, scale, positives=positives)

    s = training.setup(config(world, tmp_path, name="dup", batch_size=48))
    s.stepper.loss = spy
    tables = s.train.tables
    for item in range(0, 40, 5):  # eight pictures captioned alike, as Tux Paint's six "A flower."
        for c in tables.captions_of[item]:
            tables.captions[c] = "A flower." if item % 2 else "a flower"
    tables.__dict__.pop("caption_key", None)  # computed from the captions on first use
    shared = 0
    for items, captions in s.plan.batches(0):
        texts = [tables.captions[c] for c in captions]
        pos = s.plan.positives(items, captions)
        same = torch.tensor([[a.lower().rstrip(".") == b.lower().rstrip(".") for b in texts] for a in texts])
        shared += int(same.sum()) - len(texts)
        got = torch.eye(len(items), dtype=torch.bool) if pos is None else pos
        assert (got | ~same).all()  # identical captions are positives
        s.stepper(s.train.item_batch(items), s.train.text_batch(captions), 0, pos)
    assert shared > 0, "the example dataset should repeat some captions"
    assert any(p is not None for p in seen)
    s = training.setup(config(world, tmp_path, name="dup-neg", same_caption="negative"))
    assert all(s.plan.positives(i, c) is None for i, c in s.plan.batches(0))
