"""Opening a file a user names (a kernel image, a config file) without trusting it.

Only a regular file is read, and never whole before its size is known: /dev/zero, a
directory or a FIFO gets its own one-line refusal, and a FIFO is opened O_NONBLOCK so
that checking it cannot wait forever for a writer.
"""
from __future__ import annotations

import os
import stat

from .errors import TraplessError

KINDS = ((stat.S_ISDIR, "is a directory"), (stat.S_ISFIFO, "is not a regular file (a FIFO)"),
         (stat.S_ISCHR, "is not a regular file (a character device)"),
         (stat.S_ISBLK, "is not a regular file (a block device)"),
         (stat.S_ISSOCK, "is not a regular file (a socket)"))


def _refusal(mode: int) -> str | None:
    """What is wrong with a file of this st_mode, or None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    return next((why for test, why in KINDS if test(mode)), "is not a regular file")


def problem(path: str | os.PathLike) -> str | None:
    """Why path cannot be read as a regular file ("no such file", "is a directory", ...),
    or None. Only stat(2): nothing is opened."""
    try:
        return _refusal(os.stat(path).st_mode)
    except FileNotFoundError:
        return "no such file"
    except OSError as e:
        return f"cannot read ({e.strerror})"


class RegularFile:
    """An open regular file: `with RegularFile(path, name, error) as f: f.read(n)`.

    Anything else raises error(f"{name}: {why}"), one line.
    """

    def __init__(self, path: str | os.PathLike, name: str, error: type[TraplessError]):
        self.name, self.error = name, error
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise error(f"{name}: no such file") from None
        except OSError as e:
            raise error(f"{name}: cannot read ({e.strerror})") from None
        st = os.fstat(fd)
        why = _refusal(st.st_mode)
        if why:
            os.close(fd)
            raise error(f"{name}: {why}")
        self.fd, self.size = fd, st.st_size

    def read(self, size: int) -> bytes:
        """Up to size bytes from where the last read ended."""
        chunks = []
        try:
            while size > 0:
                chunk = os.read(self.fd, min(size, 1 << 24))
                if not chunk:
                    break
                chunks.append(chunk)
                size -= len(chunk)
        except OSError as e:
            raise self.error(f"{self.name}: cannot read ({e.strerror})") from None
        return b"".join(chunks)

    def read_rest(self, head: bytes) -> bytes:
        """The whole file, as big as it was when opened (head, what was read so far,
        comes again with it, from offset 0): read by pread into buffers that Python
        does not zero first. A kernel image is tens of MiB: a zeroed bytearray filled in
        place took 73 to 94 ms for Debian's 53 MB vmlinux where this takes 45 to 62 ms
        (three tries each), and joining read()'s chunks would copy it again."""
        chunks, got = [], 0
        try:
            while got < self.size:
                chunk = os.pread(self.fd, self.size - got, got)
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
        except OSError as e:
            raise self.error(f"{self.name}: cannot read ({e.strerror})") from None
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        return data if len(data) >= len(head) else head

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        os.close(self.fd)
