"""Where an item's bytes are: a file on disk, or a member of an uncompressed `.tar` shard
(webdataset / img2dataset), read in place without unpacking.

An item's address is a path string. A tar member is `<shard.tar>::<member name>`; `open_item`
gives an open file for a plain path and the member's bytes (an in-memory binary file) for a tar
member, so a modality's decoder reads either the same way and never learns where the bytes came
from. Both are opened through the dataset's `Roots` (`mmret.common.paths`): a file or shard that
resolves outside them, or is no regular file, is never read. A member is found by its name in
the shard's index, which Python's `tarfile` builds once per shard and process (headers only, then
a seek and one read per item): random access, so a training batch in any seeded order costs one
read per item. Nothing is ever extracted to disk,
and `resolve_item` keeps a relative address from a table inside its root.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import BinaryIO

from mmret.common.paths import Roots, UnsafePath, plain, within
from mmret.errors import MmretError

MEMBER = "::"  # shard.tar::member
TAR_ENDINGS = (".tar",)


class MemberError(Exception):
    """A tar member that cannot be read (missing shard or member, not a plain tar)."""


def member_address(shard: str | Path, member: str) -> str:
    return f"{shard}{MEMBER}{member}"


def split_address(address: str) -> tuple[str, str] | None:
    """(shard, member) of a tar member's address, else None."""
    shard, sep, member = str(address).partition(MEMBER)
    if sep and shard.lower().endswith(TAR_ENDINGS) and member:
        return shard, member
    return None


_INDEX: dict[str, tuple[tuple[int, int], dict[str, tuple[int, int]]]] = {}  # shard -> (stat, name -> (offset, size))


def _open_shard(shard: str, roots: Roots) -> BinaryIO:
    try:
        return roots.open(shard)
    except FileNotFoundError:
        raise MemberError(f"shard {shard} not found") from None
    except (UnsafePath, OSError) as e:
        raise MemberError(f"cannot read shard {shard}: {getattr(e, 'strerror', None) or e}") from None


def _index(shard: str, f: BinaryIO) -> dict[str, tuple[int, int]]:
    st = os.fstat(f.fileno())
    stamp = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
    cached = _INDEX.get(shard)
    if cached is None or cached[0] != stamp:
        try:
            with tarfile.open(fileobj=f, mode="r:") as tar:  # "r:": seekable, uncompressed only
                names = {m.name: (m.offset_data, m.size) for m in tar.getmembers() if m.isfile()}
        except (tarfile.TarError, OSError) as e:
            raise MemberError(f"cannot index shard {shard} (an uncompressed tar is needed): {e}") from None
        _INDEX[shard] = cached = (stamp, names)
    return cached[1]


def shard_index(shard: str, roots: Roots) -> dict[str, tuple[int, int]]:
    """The shard's file members by name, (offset, size) each; `MemberError` if it is no readable tar
    inside `roots`."""
    with _open_shard(shard, roots) as f:
        return _index(shard, f)


def read_member(shard: str, member: str, roots: Roots) -> bytes:
    with _open_shard(shard, roots) as f:  # the index and the bytes come from this one descriptor
        where = _index(shard, f).get(member)
        if where is None:
            raise MemberError(f"no member {member} in {shard}")
        offset, size = where
        f.seek(offset)
        return f.read(size)


def open_item(address: str | Path, roots: Roots) -> BinaryIO:
    """The item's bytes as an open binary file: a plain file opened through `roots` (an
    `UnsafePath` or `OSError` if it may not or cannot be), or a tar member's bytes in memory (named
    by its address)."""
    found = split_address(str(address))
    if found is None:
        return roots.open(address)
    data = io.BytesIO(read_member(*found, roots))
    data.name = str(address)
    return data


def resolve_item(root: Path, stored: str, absolute: bool = True) -> str:
    """The address of an item a table stores relative to `root`: a relative address whose name
    leaves `root` ("../") is refused, and so is an absolute one unless `absolute` (folder datasets
    point at files where they are; shard datasets keep everything under their root). A link that
    leaves it is refused when the file is read, by the dataset's `Roots`."""
    found = split_address(stored)
    path = found[0] if found else stored
    if os.path.isabs(path):
        if absolute:
            return stored
        raise MmretError(f"the item {stored!r} is outside the dataset's root {root}; prepare the dataset again")
    # By the names alone: a table of 100,000 items must open in a blink, and a link is caught where
    # it counts, when the file is read (`Roots` follows it then).
    full = os.path.join(root, path)
    if not plain(full):  # `..`, `.` or `//` in the name: normalise it as pathlib does, then check
        full = str(root / path)
        if not within(full, root):
            raise MmretError(f"the item {stored!r} points outside the dataset's root {root}; "
                             "prepare the dataset again")
    return member_address(full, found[1]) if found else full
