"""The download script against a local HTTP server on 127.0.0.1 (no internet)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from task_data.download import download, verified
from tests.conftest import DATA_DIR, REPO, serve_folder

GOOD = ["sonnets_held_out_dev.txt", "ids-cfimdb-dev.csv"]
CORRUPT = "TRUE_sonnets_held_out_dev.txt"


@pytest.fixture
def server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    for name in GOOD:
        shutil.copy(DATA_DIR / name, served / name)
    corrupted = bytearray((DATA_DIR / CORRUPT).read_bytes())
    corrupted[100] ^= 0x20  # flip one bit of one character
    (served / CORRUPT).write_bytes(bytes(corrupted))
    with serve_folder(served) as url:
        yield url


def test_good_files_land_corrupt_rejected_rerun_skips(server, tmp_path):
    out = tmp_path / "data"
    report = download(out, server, GOOD + [CORRUPT], timeout=10, progress=False)
    assert sorted(report.downloaded) == sorted(GOOD)
    assert CORRUPT in report.failed and "mismatch" in report.failed[CORRUPT]
    assert all(verified(out / name, name) for name in GOOD)
    assert not (out / CORRUPT).exists() and not list(out.glob("*.part"))
    again = download(out, server, GOOD + [CORRUPT], timeout=10, progress=False)
    assert sorted(again.skipped) == sorted(GOOD) and again.downloaded == []


def test_cli_exit_status(server, tmp_path):
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "download_data.py"),
        "--out",
        str(tmp_path / "d"),
        "--base-url",
        server,
        "--no-progress",
        "--files",
    ]
    ok = subprocess.run(cmd + GOOD, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "downloaded  ids-cfimdb-dev.csv" in ok.stdout
    bad = subprocess.run(cmd + [CORRUPT], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "sha256 mismatch" in bad.stderr


def test_missing_file_on_server_is_reported(server, tmp_path):
    report = download(tmp_path / "d", server, ["quora-dev.csv"], timeout=10, progress=False)
    assert "download failed" in report.failed["quora-dev.csv"]


def test_git_blob_checksum_of_quora_subset_is_not_the_release():
    # Our shared Quora files are a subset, so they must NOT verify as the release's files.
    assert not verified(DATA_DIR / "quora-dev.csv", "quora-dev.csv")
    assert verified(DATA_DIR / "ids-sst-dev.csv", "ids-sst-dev.csv")
