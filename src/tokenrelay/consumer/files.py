"""Files that appear only when complete, are never replaced, and survive a machine crash."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from types import TracebackType


class NewFile:
    """A file written in pieces without a name, then given one only if the name is free.

    The data goes into an unnamed file (O_TMPFILE) that is linked into place when complete,
    so a reader never sees half a file, and a process killed midway leaves nothing behind.
    Where O_TMPFILE is missing, a hidden temporary name (which a crash can leave) is used.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._tmp: str | None = None
        try:
            self._fd = os.open(directory, os.O_TMPFILE | os.O_WRONLY, 0o644)
        except (AttributeError, OSError):  # no O_TMPFILE on this system or file system
            self._fd, self._tmp = tempfile.mkstemp(dir=directory, prefix=".", suffix=".tmp")

    def write(self, data: bytes) -> None:
        """Append `data`."""
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]

    def truncate(self) -> None:
        """Drop everything written so far; the next `write` starts the file again."""
        os.ftruncate(self._fd, 0)
        os.lseek(self._fd, 0, os.SEEK_SET)

    def link(self, name: str) -> bool:
        """Make the file `directory/name`, durably; False (and nothing changed) if it exists."""
        os.fsync(self._fd)
        directory = os.open(self.directory, os.O_RDONLY)
        try:
            if self._tmp is not None:
                os.link(self._tmp, self.directory / name)
            else:
                # linkat(…, AT_SYMLINK_FOLLOW), which os.link uses only when given directory
                # fds. It fails if the name exists, unlike a rename.
                source = f"/proc/self/fd/{self._fd}"
                os.link(source, name, src_dir_fd=directory, dst_dir_fd=directory)
            os.fsync(directory)  # the new name survives a machine crash
        except FileExistsError:
            return False
        finally:
            os.close(directory)
        return True

    def close(self) -> None:
        """Release the file; an unlinked one is gone."""
        os.close(self._fd)
        if self._tmp is not None:
            os.unlink(self._tmp)

    def __enter__(self) -> NewFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def write_once(path: Path, data: bytes) -> bool:
    """Create `path` with `data`, atomically and durably, unless it exists; True if created."""
    with NewFile(path.parent) as new:
        new.write(data)
        return new.link(path.name)
