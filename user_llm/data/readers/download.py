"""Fetches the official MovieLens archives from GroupLens into a local cache, checksum-verified.

Only ml-latest-small may be redistributed (and is bundled with this package); the other
releases must come from GroupLens on the user's machine. Without network access the error says
which file to download and where to put it, so an offline machine can be prepared by hand.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

BASE_URL = "https://files.grouplens.org/datasets/movielens"

# Published MD5s (GroupLens ``<archive>.zip.md5`` sidecars). ml-latest is rebuilt over time,
# so it has no fixed checksum.
MOVIELENS_MD5: dict[str, str | None] = {
    "ml-100k": "0e33842e24a9c977be4e0107933c0723",
    "ml-1m": "c4d9eecfca2ab87c1945afe126590906",
    "ml-20m": "cd245b17a1ae2cc31bb14903e1204af3",
    "ml-25m": "6b51fb2759a8657d3bfcbfc42b592ada",
    "ml-latest": None,
    "ml-latest-small": "31a303aabbc519bd33d025e44d6c2570",
}


def default_cache_dir() -> Path:
    """``$USER_LLM_DATA`` or ``~/.cache/user_llm/movielens``."""
    root = os.environ.get("USER_LLM_DATA")
    return Path(root) if root else Path.home() / ".cache" / "user_llm" / "movielens"


def movielens_url(name: str) -> str:
    """The official download URL of a MovieLens release (e.g. ``ml-1m``)."""
    if name not in MOVIELENS_MD5:
        raise ValueError(f"unknown MovieLens release {name!r}; known: {sorted(MOVIELENS_MD5)}")
    return f"{BASE_URL}/{name}.zip"


def file_digests(path: Path) -> dict[str, str]:
    """{"md5": ..., "sha256": ...} hex digests of a file, from one read in 1 MiB blocks."""
    hashes = {name: hashlib.new(name) for name in ("md5", "sha256")}
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            for h in hashes.values():
                h.update(block)
    return {name: h.hexdigest() for name, h in hashes.items()}


def fetch_movielens(name: str, cache_dir: str | Path | None = None, timeout: float = 60) -> Path:
    """Path of ``<cache_dir>/<name>.zip``, downloading and verifying it if it is not there yet.

    A cached file with the wrong checksum is an error (not silently replaced): it may be a
    truncated download or a planted file, and the user should see it. Every cached archive
    gets a SHA-256 sidecar (``<name>.zip.sha256``) at its first use, checked at every later
    one; for ml-latest, which GroupLens rebuilds and publishes no checksum for, that pin of
    the first download is the only check, and the first use says so.
    """
    url = movielens_url(name)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = cache / f"{name}.zip"
    expected = MOVIELENS_MD5[name]
    if target.exists():
        _check_and_pin(target, expected, url)
        return target
    cache.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".zip.part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as f:
            shutil.copyfileobj(response, f)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        partial.unlink(missing_ok=True)
        raise ConnectionError(
            f"could not download {url} ({e}). On a machine without network access, download "
            f"{name}.zip from {url} elsewhere and place it at {target} (or pass the extracted "
            f"folder or the .zip as data_dir)."
        ) from e
    _check_and_pin(partial, expected, url, pin_as=target)
    return target


def _check_and_pin(path: Path, md5: str | None, url: str, pin_as: Path | None = None) -> None:
    """Checks the file against its published ``md5`` (if any) and its SHA-256 sidecar, or
    writes the sidecar at first use; ``pin_as`` moves a fresh download into place first."""
    digests = file_digests(path)
    if md5 is not None and digests["md5"] != md5:
        raise ValueError(
            f"{path} has md5 {digests['md5']}, expected {md5}: a partial or altered download. "
            f"Delete it and fetch {url} again."
        )
    if pin_as is not None:
        path = path.replace(pin_as)
    got, sidecar = digests["sha256"], path.with_name(path.name + ".sha256")
    if sidecar.exists():
        pinned = (sidecar.read_text().split() or [""])[0]
        if got != pinned:
            raise ValueError(
                f"{path} has sha256 {got}, but {sidecar} pinned {pinned} at its first use: the "
                f"file changed since. If that is intended, delete both and fetch {url} again."
            )
        return
    try:
        sidecar.write_text(f"{got}  {path.name}\n")
    except OSError as e:  # a read-only cache: still usable, just not pinned
        print(f"NOTE: could not pin {path} ({e}); its sha256 is {got}", flush=True)
        return
    if MOVIELENS_MD5.get(path.stem) is None:
        print(
            f"NOTE: {path.name} has no published checksum (GroupLens rebuilds it); pinned its "
            f"sha256 {got} in {sidecar}, checked at every later use.",
            flush=True,
        )
