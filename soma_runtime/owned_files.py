"""Small files a process writes for others to read (a bridge's URL, a channel's token), and
removes when it stops: only if the file is still the one it wrote. Another process may have
replaced it since (another sidecar serving the same name), and its file is not ours to remove.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from soma_runtime.unix import private_umask


@dataclass(frozen=True, slots=True)
class OwnedFile:
    path: Path
    identity: tuple[int, int]  # st_dev, st_ino of the file written
    content: bytes

    @classmethod
    def write(cls, path: Path, text: str) -> OwnedFile:
        """Write `text` to `path` atomically (a reader sees the old file or the whole new
        one), mode 0600."""
        content = text.encode()
        fresh = path.with_name(f".{path.name}.{os.getpid()}")
        try:
            with private_umask():
                fresh.write_bytes(content)
            written = fresh.stat()
            os.replace(fresh, path)
        except BaseException:
            fresh.unlink(missing_ok=True)
            raise
        return cls(path, (written.st_dev, written.st_ino), content)

    def _is_ours(self) -> bool:
        try:
            info = self.path.lstat()
            if (info.st_dev, info.st_ino) != self.identity:
                return False
            return self.path.read_bytes() == self.content
        except OSError:
            return False

    def remove(self) -> None:
        """Remove the file, unless it is gone or is no longer the one written."""
        if self._is_ours():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
