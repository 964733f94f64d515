"""MovieLens download (no network: urllib is monkeypatched) and the stats CLI."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from datagen import REPO_ROOT

from user_llm.data import readers
from user_llm.data.readers import download


def test_urls_are_official():
    assert download.movielens_url("ml-1m") == (
        "https://files.grouplens.org/datasets/movielens/ml-1m.zip"
    )
    assert download.MOVIELENS_MD5["ml-latest-small"] == "31a303aabbc519bd33d025e44d6c2570"
    with pytest.raises(ValueError, match="unknown MovieLens release"):
        download.movielens_url("ml-2b")


def test_offline_error_says_where_to_put_the_file(tmp_path, monkeypatch):
    def offline(*args, **kw):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(ConnectionError) as err:
        readers.load("movielens", "ml-1m", cache_dir=tmp_path)
    msg = str(err.value)
    assert "https://files.grouplens.org/datasets/movielens/ml-1m.zip" in msg
    assert str(tmp_path / "ml-1m.zip") in msg
    assert not list(tmp_path.iterdir())  # no partial file left behind


def test_download_verifies_md5(tmp_path, monkeypatch):
    payload = b"not really a zip"
    monkeypatch.setitem(download.MOVIELENS_MD5, "ml-1m", hashlib.md5(payload).hexdigest())
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: io.BytesIO(payload))
    path = download.fetch_movielens("ml-1m", tmp_path)
    assert path.read_bytes() == payload
    assert download.fetch_movielens("ml-1m", tmp_path) == path  # cached: no second download
    monkeypatch.setitem(download.MOVIELENS_MD5, "ml-1m", "0" * 32)
    with pytest.raises(ValueError, match="partial or altered download"):
        download.fetch_movielens("ml-1m", tmp_path)


def test_stats_cli_on_bundled_ml_latest_small():
    proc = subprocess.run(
        [sys.executable, "-m", "user_llm.data.stats", "--dataset=movielens"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    stats = json.loads(lines[0])
    assert (stats["num_interactions"], stats["num_users"], stats["num_items"]) == (
        100836,
        610,
        9742,
    )
    assert stats["num_rated_items"] == 9724
    hist = stats["history_length"]
    assert hist["p5"] >= 20 and hist["p50"] == 70.5 and hist["max"] == 2698


def test_stats_cli_reports_bad_data(tmp_path):
    (tmp_path / "review-X.json").write_text('{"user_id": "1"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "user_llm.data.stats", "--dataset=google_local",
         f"--data_dir={tmp_path}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1 and "review-X.json:1" in proc.stderr


def test_every_cached_archive_is_pinned_by_sha256_at_first_use(tmp_path, monkeypatch, capsys):
    """ml-latest has no published checksum: the first download is pinned, and a file planted
    or altered later is refused."""
    payload = b"first download"
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: io.BytesIO(payload))
    path = download.fetch_movielens("ml-latest", tmp_path)
    sidecar = tmp_path / "ml-latest.zip.sha256"
    assert sidecar.read_text().split()[0] == hashlib.sha256(payload).hexdigest()
    assert "no published checksum" in capsys.readouterr().out
    assert download.fetch_movielens("ml-latest", tmp_path) == path  # same file: accepted
    path.write_bytes(b"planted")
    with pytest.raises(ValueError, match="pinned .* at its first use"):
        download.fetch_movielens("ml-latest", tmp_path)
