"""The one error family that reaches the user, and the one line for every other failure.

Library code raises `MmretError` with a message written for the person at the terminal: what was
wrong and what to do. The CLI turns it into one red line on stderr and exit code 1. Failures that
are not ours but expected (a full or read-only disk, a missing permission, memory) are turned into
such a line by `explain`, and anything else still gives one line, never a traceback, unless
MMRET_DEBUG=1 asks for it.
"""

from __future__ import annotations

import errno
import re


class MmretError(Exception):
    """An error the user can act on; its message is shown as is, without a traceback."""


# C0 and C1 control characters (ESC starts a terminal's control sequences, BEL ends some), DEL, and the
# invisible marks that reorder text on screen (bidirectional overrides, isolates)
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """`text` safe to print on one terminal line: every control character written as its escape
    (`\\x1b`, `\\n`), so a file's content can neither move the cursor, retitle the window, clear
    the screen nor break the line."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(text))


_OS_ADVICE = {
    errno.ENOSPC: "the disk is full: free some space (or point --data-dir / --runs-dir at a larger disk) and run "
                  "the command again; what was finished before is kept",
    errno.EDQUOT: "the disk quota is used up: free some space and run the command again",
    errno.EROFS: "the file system is read-only: point --data-dir / --runs-dir at a writable folder",
    errno.EACCES: "permission denied: use a folder you may write to (--data-dir / --runs-dir) or fix its permissions",
    errno.EPERM: "operation not permitted: use a folder you may write to (--data-dir / --runs-dir)",
    errno.ENOENT: "no such file or folder",
    errno.EISDIR: "a folder was given where a file is needed",
    errno.ENOTDIR: "a file was given where a folder is needed",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n) or use fewer --workers",
}


def explain(error: BaseException) -> str:
    """One line for any failure: the MmretError's message, or what went wrong and what to do."""
    if isinstance(error, MmretError):
        return str(error)
    if isinstance(error, OSError):
        where = " ".join(str(f) for f in (error.filename, error.filename2) if f)
        advice = _OS_ADVICE.get(error.errno or -1) or (error.strerror or str(error))
        return f"{where}: {advice}" if where else advice
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return ("out of memory: use a smaller --batch-size or --micro-batch (`mmret probe-memory --vram GB` finds a "
                "setting that fits)")
    first = (str(error).strip().splitlines() or [""])[0]
    return (f"unexpected {type(error).__name__}: {first[:300]} (run again with MMRET_DEBUG=1 to see where, and "
            "please report it)")
