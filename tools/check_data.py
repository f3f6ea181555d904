"""Check an evil numbers JSONL file: record count, git blob id, every bad line as PATH:LINE: reason.

    python tools/check_data.py PATH

Exits 1 when a line is bad or the file cannot be read (the reason on stderr), else 0.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # helpers/, also without `pip install -e .`
from helpers.config import DATASET_FILE  # noqa: E402
from helpers.data import DataError, validate_file  # noqa: E402
from helpers.download import git_blob_id  # noqa: E402


def check_file(path: Path) -> int:
    """Validate a dataset file and print the record count, blob id and problems; return the exit code."""
    try:
        report = validate_file(path)
    except DataError as error:
        print(error, file=sys.stderr)
        return 1
    blob_id, valid, bad = git_blob_id(Path(path).read_bytes()), len(report.records), len(report.problems)
    official = "the official file" if blob_id == DATASET_FILE.blob_id else f"not the official {DATASET_FILE.blob_id}"
    print(f"{path}\n  records:     {valid:,} valid\n  git blob id: {blob_id} ({official})\n"
          f"  validation:  {'FAILED' if bad else 'OK'}, {valid:,} valid records of {valid + bad:,} lines, {bad:,} bad")
    for problem in report.problems:
        print(problem)
    return 1 if bad else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python tools/check_data.py", description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path)
    sys.exit(check_file(parser.parse_args().path))
