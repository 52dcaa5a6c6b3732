"""Which slice of the work this process does: `--shard i/N`, or the rank and world size that
torchrun (RANK, WORLD_SIZE) or SLURM (SLURM_PROCID, SLURM_NTASKS) give each process."""

from __future__ import annotations

import os

from mmret.errors import MmretError

Shard = tuple[int, int]  # (index, count): this process does the items whose number is index mod count


def parse_shard(text: str) -> Shard:
    """`"i/N"` (0 <= i < N) as (i, N); anything else is a one-line error."""
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit()) or not 0 <= int(index) < int(count):
        raise MmretError(f"--shard must be i/N with 0 <= i < N (e.g. 0/4 ... 3/4), got {text!r}")
    return int(index), int(count)


def env_shard() -> Shard | None:
    """(rank, world size) when torchrun or srun started several processes, else None."""
    env = os.environ
    for rank, size in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if int(env.get(size, "1") or 1) > 1 and env.get(rank, "").isdigit():
            return int(env[rank]), int(env[size])
    return None


def shard_of(text: str | None) -> Shard | None:
    """The shard a command works on: `--shard` if given, else the launcher's, else None (all of it)."""
    return parse_shard(text) if text else env_shard()
