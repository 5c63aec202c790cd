"""Download the task data (course release, pinned commit, checksums verified).

    python scripts/download_data.py --out data/cs224n

Re-running skips files already present and verified; a corrupted download is rejected. Exit status
1 if any file failed. `--base-url` points elsewhere (a mirror, or a local server in the tests).
"""

from __future__ import annotations

import argparse
import sys

from task_data.download import BASE_URL, RELEASE_FILES, download
from train.cli.exits import exit_status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/cs224n", help="folder to write into (default: data/cs224n)")
    parser.add_argument("--base-url", default=BASE_URL, help="where the release's data/ folder is served")
    parser.add_argument("--files", nargs="*", default=None, help=f"subset of: {' '.join(RELEASE_FILES)}")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    report = download(args.out, args.base_url, args.files, args.timeout, progress=not args.no_progress)
    for name in report.downloaded:
        print(f"downloaded  {name}")
    for name in report.skipped:
        print(f"present     {name} (verified)")
    for name, reason in report.failed.items():
        print(f"FAILED      {name}: {reason}", file=sys.stderr)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(exit_status(main))
