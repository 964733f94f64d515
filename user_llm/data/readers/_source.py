"""A folder or a .zip archive seen the same way: find files by name, read their bytes."""

from __future__ import annotations

import zipfile
from pathlib import Path

from user_llm.data.readers._io import DECOMPRESSION_ERRORS, corrupt_file
from user_llm.data.tables import DataError

# One archive member is read into memory: bound it (the largest MovieLens file, ml-32m's
# ratings.csv, is ~0.9 GB; text compresses ~3-10x, a zip bomb ~1000x).
MAX_MEMBER_BYTES = 4 << 30
MAX_RATIO = 100


class FileSource:
    """Files of an extracted release folder or of the release .zip itself."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        if not self.root.exists():
            raise FileNotFoundError(f"{self.root} does not exist")
        self._zip = None
        if self.root.is_file():
            if not zipfile.is_zipfile(self.root):
                raise DataError(str(self.root), None, "expected a folder or a .zip archive")
            self._zip = zipfile.ZipFile(self.root)
            self.names = [n for n in self._zip.namelist() if not n.endswith("/")]
        else:
            self.names = [
                p.relative_to(self.root).as_posix()
                for p in sorted(self.root.rglob("*"))
                if p.is_file() and len(p.relative_to(self.root).parts) <= 3
            ]

    def find(self, basename: str) -> str | None:
        """The shallowest file called ``basename`` (None if absent)."""
        hits = [n for n in self.names if n.rsplit("/", 1)[-1] == basename]
        hits = [n for n in hits if not n.startswith("__MACOSX/")]
        return min(hits, key=lambda n: (n.count("/"), n)) if hits else None

    def read(self, name: str) -> bytes:
        if self._zip is None:
            return (self.root / name).read_bytes()
        info = self._zip.getinfo(name)
        if info.file_size > MAX_MEMBER_BYTES or (
            info.file_size > 64 << 20 and info.file_size > MAX_RATIO * max(info.compress_size, 1)
        ):
            raise DataError(
                self.display(name),
                None,
                f"expands to {info.file_size:,} bytes from {info.compress_size:,} (limits: "
                f"{MAX_MEMBER_BYTES:,} bytes, ratio {MAX_RATIO}); not a release file",
            )
        try:
            return self._zip.read(name)
        except DECOMPRESSION_ERRORS as e:
            raise corrupt_file(self.display(name), None, e) from None

    def display(self, name: str) -> str:
        """How error messages name a file: ``archive.zip/member`` or the full path."""
        return f"{self.root}/{name}" if self._zip is not None else str(self.root / name)
