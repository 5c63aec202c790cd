"""Fetch the course release's data files, pinned to one commit, each verified before it is kept.

Source: the public repository cfifty/public_cs224n_gpt at commit 7570cfa…, folder data/. Files are
checked against pinned sha256 sums (the Quora files against their git blob ids, which is what
the release's repository records for them). Each file is downloaded to `<name>.part` (resumed with
an HTTP Range request when the server allows it), verified, and only then renamed into place, so
a crash never leaves a half-written or unverified file under the real name. Files already present
and correct are skipped.
"""

from __future__ import annotations

import hashlib
import os
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

REPOSITORY = "cfifty/public_cs224n_gpt"
COMMIT = "7570cfa4385f3417298573c770df5ddfe2d97f89"
BASE_URL = f"https://raw.githubusercontent.com/{REPOSITORY}/{COMMIT}/data/"

# (kind, digest): "sha256" of the bytes, or "git-blob" = sha1(b"blob <size>\0" + bytes).
CHECKSUMS: dict[str, tuple[str, str]] = {
    "TRUE_sonnets_held_out.unofficial.txt": (
        "sha256",
        "9e6b4a212a389027410ab5c6302d6ff7dfa4b5db76bdd83ada5865ce2fc4dbfb",
    ),
    "TRUE_sonnets_held_out_dev.txt": ("sha256", "fb41ee87e70107f554b658c8de07a6ae905298db09da84794dfaa2a61e892a1f"),
    "ids-cfimdb-dev.csv": ("sha256", "3087f571b66860fe5d035b5a018d08202ad3fd3720e4821c04b2acf6c7ded559"),
    "ids-cfimdb-test-student.csv": ("sha256", "7ae611548c9eac879e9ebb406cc9f8ae68ff12f78090e4965af5cbdfa06240f4"),
    "ids-cfimdb-train.csv": ("sha256", "140fc513045a966109faed46a5c7a898767b96714d71bcb9c15f659129fadcea"),
    "ids-sst-dev.csv": ("sha256", "a186ce94577635fbe10beaaddd50f16cccf6c30973221cefdf90deed2a584bfe"),
    "ids-sst-test-student.csv": ("sha256", "bdd5a767faa0c26782117e37767ece154c30d5d04fb8727d09c71e3850a55c7b"),
    "ids-sst-train.csv": ("sha256", "03b2b625c090f94a6afd59f114cde5282e2053aab0b101e87ed695d8a0c5b1df"),
    "sonnets.txt": ("sha256", "722836995bea43c112897546c7d09a81458b740bb510596f7e81104ca3ab624e"),
    "sonnets_held_out.txt": ("sha256", "41417eafa263e822f1bb9e52fbdbe0ff910982d2f7663231afd3b7d6b3174ae6"),
    "sonnets_held_out_dev.txt": ("sha256", "309ae8da81a24de61a261c291c1299f5c6bfbf4e6b7d1d5b50bd15b6c1770afd"),
    "quora-train.csv": ("git-blob", "1f2e73b884113e629e2786001fb9cc8ae4a696c1"),
    "quora-dev.csv": ("git-blob", "97f9430a53b7f5544f857ff27a236c40bb42b5c7"),
    "quora-test-student.csv": ("git-blob", "a1b1e5ba3ef282ba1e9b169c509eb80dbbc68666"),
}
# The unofficial test gold is not part of the release; it is checked when present, not fetched.
RELEASE_FILES = [name for name in CHECKSUMS if not name.endswith(".unofficial.txt")]


def digest(path: Path, kind: str) -> str:
    if kind == "sha256":
        hasher = hashlib.sha256()
    elif kind == "git-blob":
        hasher = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    else:
        raise ValueError(f"unknown checksum kind {kind!r}")
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(chunk)
    return hasher.hexdigest()


def verified(path: Path, name: str) -> bool:
    kind, expected = CHECKSUMS[name]
    return path.is_file() and digest(path, kind) == expected


@dataclass
class DownloadReport:
    downloaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already present and verified
    failed: dict[str, str] = field(default_factory=dict)  # name -> reason


def _fetch(url: str, part: Path, timeout: float, progress: bool) -> None:
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        resumed = offset and response.status == 206
        mode = "ab" if resumed else "wb"
        total = response.length
        with (
            open(part, mode) as handle,
            tqdm(total=total, unit="B", unit_scale=True, desc=part.stem, disable=not progress, leave=False) as bar,
        ):
            for chunk in iter(lambda: response.read(1 << 16), b""):
                handle.write(chunk)
                bar.update(len(chunk))
            handle.flush()
            os.fsync(handle.fileno())


def download(
    out_dir: str | Path,
    base_url: str = BASE_URL,
    names: list[str] | None = None,
    timeout: float = 60.0,
    progress: bool = True,
) -> DownloadReport:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = DownloadReport()
    for name in names or RELEASE_FILES:
        if name not in CHECKSUMS:
            raise ValueError(f"unknown data file {name!r}; known: {', '.join(CHECKSUMS)}")
        target = out_dir / name
        if verified(target, name):
            report.skipped.append(name)
            continue
        part = out_dir / (name + ".part")
        try:
            _fetch(base_url.rstrip("/") + "/" + name, part, timeout, progress)
        except OSError as error:  # network errors; the .part stays for a resume
            report.failed[name] = f"download failed: {error}"
            continue
        kind, expected = CHECKSUMS[name]
        got = digest(part, kind)
        if got != expected:
            part.unlink()
            report.failed[name] = f"{kind} mismatch: expected {expected}, got {got}; the file was discarded"
            continue
        os.replace(part, target)  # atomic: the real name only ever holds a verified file
        report.downloaded.append(name)
    return report
