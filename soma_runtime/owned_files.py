"""Small files a process writes for others to read (a bridge's URL, a channel's token), and
removes when it stops: only if the file is still the one it wrote. Another process may have
replaced it since (another sidecar serving the same name), and its file is not ours to remove.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from soma_runtime.unix import write_private_file


@dataclass(frozen=True, slots=True)
class OwnedFile:
    path: Path
    identity: tuple[int, int]  # st_dev, st_ino of the file written
    content: bytes

    @classmethod
    def write(cls, path: Path, text: str) -> OwnedFile:
        """Write `text` to `path` atomically (a reader sees the old file or the whole new
        one), mode 0600, never through a link (`write_private_file`)."""
        content = text.encode()
        directory = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            written = write_private_file(directory, path.name, content)
        finally:
            os.close(directory)
        return cls(path, (written.st_dev, written.st_ino), content)

    def _is_ours(self) -> bool:
        """Whether `path` is still the file written, with what was written: opened without
        following a link or waiting (a FIFO put there is someone else's file)."""
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            with open(os.open(self.path, flags), "rb") as file:
                info = os.fstat(file.fileno())
                if (info.st_dev, info.st_ino) != self.identity:
                    return False
                return file.read(len(self.content) + 1) == self.content
        except OSError:
            return False

    def remove(self) -> None:
        """Remove the file, unless it is gone or is no longer the one written."""
        if self._is_ours():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
