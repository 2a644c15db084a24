"""Files that a kill at any moment leaves readable.

Whole files (tables, JSON results, manifests) are written to a temporary file in the same folder,
flushed to disk and renamed over the target: a reader sees the old file or the new one, never half
of one. Record logs (JSON lines) are appended one whole line per ``write`` call, flushed and synced;
a kill can leave at most a torn last line, which :func:`append_line` cuts off before appending, so
the next record never lands on the end of a broken one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) in one rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())      # mkstemp makes it private; the result reads like any new file
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cut_torn_tail(path: str | os.PathLike) -> int:
    """Truncate ``path`` after its last newline (a line cut short by a kill); bytes removed."""
    path = Path(path)
    if not path.is_file():
        return 0
    with open(path, "rb+") as handle:
        size = handle.seek(0, os.SEEK_END)
        end = size
        while end > 0:                      # scan back in blocks for the last newline
            start = max(0, end - 65536)
            handle.seek(start)
            block = handle.read(end - start)
            cut = block.rfind(b"\n")
            if cut >= 0:
                end = start + cut + 1
                break
            end = start
        if end < size:
            handle.truncate(end)
            handle.flush()
            os.fsync(handle.fileno())
        return size - end


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line (no newline inside) to a JSON-lines log, durably: a torn last line left by
    an earlier kill is cut off first, and the line goes out in a single write, flushed and synced."""
    if "\n" in line:
        raise ValueError("a record line must not contain a newline")
    cut_torn_tail(path)
    data = (line + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = 0
        while written < len(data):          # os.write may write less than asked (signals, pipes)
            written += os.write(fd, data[written:])
        os.fsync(fd)
    finally:
        os.close(fd)
