"""One address for the course's repository, written in the file REPOSITORY and everywhere a learner uses it.

    python tools/set_repository.py https://github.com/OWNER/NAME   # a fork or a mirror: rewrite them all
    python tools/set_repository.py                                 # check that they all agree (exit 1 if not)

The address appears in every notebook's Colab badge and Colab setup cell (notebooks/ and the generated
solutions/), and in the Colab badges and `git clone` lines of README.md and docs/*.md. Rewriting sets each
badge to the address, keeps the notebook it opens, and replaces each setup cell by `setup_cell(address)`;
every other cell, id and metadata stays as it is (notebooks stay stripped of outputs).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ADDRESS_FILE = ROOT / "REPOSITORY"
DEFAULT_ADDRESS = "https://github.com/em-course/evil-numbers-qwen3"

_NAME = r"[A-Za-z0-9_.-]+"
_ADDRESS = re.compile(rf"^(?:https?://)?(?:www\.)?(?:github\.com/)?(?P<owner>{_NAME})/(?P<name>{_NAME}?)(?:\.git)?/?$")
# A Colab badge's link: colab.research.google.com/github/OWNER/NAME/blob/BRANCH/PATH.ipynb
BADGE = re.compile(rf"https://colab\.research\.google\.com/github/(?P<repo>{_NAME}/{_NAME})/blob/(?P<branch>[^/\s)]+)/(?P<path>[^\s)\"']+?\.ipynb)")
CLONE = re.compile(rf"(?P<head>git clone[^\n]*?https://github\.com/)(?P<repo>{_NAME}/{_NAME}?)(?P<tail>\.git)?(?=[\s`)]|$)", re.M)


def repository_of(address: str) -> str:
    """OWNER/NAME from https://github.com/OWNER/NAME (also github.com/OWNER/NAME, OWNER/NAME, a .git suffix)."""
    found = _ADDRESS.match(address.strip())
    if not found:
        raise SystemExit(f"{address!r} is not a GitHub repository address; expected https://github.com/OWNER/NAME")
    return f"{found['owner']}/{found['name']}"


def read_address() -> str:
    """OWNER/NAME from the file REPOSITORY (the default address when the file is absent)."""
    text = ADDRESS_FILE.read_text(encoding="utf-8").strip() if ADDRESS_FILE.is_file() else DEFAULT_ADDRESS
    return repository_of(text)


def setup_cell(repo: str) -> str:
    """The first code cell of every notebook: on Colab, clone the course, install it, optionally use Drive."""
    folder = f"/content/{repo.split('/')[1]}"
    return (
        "# Setup: on Colab, fetch the course and install it (a few minutes); locally this cell does nothing.\n"
        "import os\n"
        "import sys\n"
        "keep_on_drive = False  # True: the run directory lives on your Google Drive, where the next notebooks find it\n"
        'if "google.colab" in sys.modules:\n'
        f"    !test -d {folder} || git clone -q --depth 1 https://github.com/{repo} {folder}\n"
        f"    %cd -q {folder}\n"
        "    %pip install -q -r requirements-gpu.txt\n"
        "    if keep_on_drive:\n"
        "        from google.colab import drive\n"
        '        drive.mount("/content/drive")\n'
        '        os.environ["EM_RUN_DIR"] = "/content/drive/MyDrive/evil-numbers-runs/{profile}"'
    )


def is_setup_cell(cell: dict) -> bool:
    return cell["cell_type"] == "code" and "google.colab" in "".join(cell["source"])


def _like(source: str | list[str], text: str) -> str | list[str]:
    """`text` stored the way `source` was: one string, or a list of lines (what nbformat writes)."""
    return text if isinstance(source, str) else text.splitlines(keepends=True)


def rewrite_notebook(text: str, repo: str, notebook_name: str) -> tuple[str, list[str]]:
    """(the notebook with its badges and setup cell for `repo`, what differed). The badge opens
    notebooks/<notebook_name> (solutions/ are generated from notebooks/ and keep their badge)."""
    nb, problems = json.loads(text), []
    setups = [index for index, cell in enumerate(nb["cells"]) if is_setup_cell(cell)]
    if len(setups) != 1:
        problems.append(f"{len(setups)} Colab setup cells (code cells naming google.colab); expected one")
    for index in setups[:1]:
        if "".join(nb["cells"][index]["source"]) != setup_cell(repo):
            problems.append(f"cell {index}: the Colab setup cell differs from tools/set_repository.py's")
            nb["cells"][index]["source"] = _like(nb["cells"][index]["source"], setup_cell(repo))
    badges = 0
    for index, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "markdown":
            continue
        source = "".join(cell["source"])
        expected = f"https://colab.research.google.com/github/{repo}/blob/main/notebooks/{notebook_name}"
        for badge in BADGE.finditer(source):
            badges += 1
            if badge[0] != expected:
                problems.append(f"cell {index}: badge {badge[0]} (expected {expected})")
        fixed = BADGE.sub(expected, source)
        if fixed != source:
            cell["source"] = _like(cell["source"], fixed)
    if not badges:
        problems.append("no Colab badge")
    return json.dumps(nb, indent=1, ensure_ascii=False) + "\n", problems


def rewrite_markdown(text: str, repo: str) -> tuple[str, list[str]]:
    """(the document with its Colab badges and `git clone` lines for `repo`, what differed)."""
    problems = [f"badge {m[0]}" for m in BADGE.finditer(text) if m["repo"] != repo or m["branch"] != "main"]
    problems += [f"`git clone` of {m['repo']}" for m in CLONE.finditer(text) if m["repo"] != repo or m["tail"]]
    text = BADGE.sub(lambda m: f"https://colab.research.google.com/github/{repo}/blob/main/{m['path']}", text)
    text = CLONE.sub(lambda m: f"{m['head']}{repo}", text)
    return text, problems


def course_files(root: Path = ROOT) -> list[Path]:
    """Every file that carries the address: notebooks/, solutions/, README.md, docs/*.md."""
    notebooks = [p for folder in ("notebooks", "solutions") for p in sorted((root / folder).glob("[0-9][0-9]_*.ipynb"))]
    documents = [p for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))] if p.is_file()]
    return notebooks + documents


def disagreements(repo: str, write: bool, root: Path = ROOT) -> dict[Path, list[str]]:
    """{file: what differs from `repo`} over `course_files`; with `write`, rewrite those files."""
    found = {}
    for path in course_files(root):
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".ipynb":
            fixed, problems = rewrite_notebook(text, repo, path.name)
        else:
            fixed, problems = rewrite_markdown(text, repo)
        if problems:
            found[path] = problems
        if write and fixed != text:
            path.write_text(fixed, encoding="utf-8")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/set_repository.py", description=__doc__.splitlines()[0])
    parser.add_argument("address", nargs="?", help="https://github.com/OWNER/NAME; without it, check agreement")
    args = parser.parse_args(argv)
    if args.address:
        repo = repository_of(args.address)
        ADDRESS_FILE.write_text(f"https://github.com/{repo}\n", encoding="utf-8")
        changed = disagreements(repo, write=True)
        for path, problems in changed.items():
            print(f"rewrote {path.relative_to(ROOT)} ({len(problems)} change(s))")
        print(f"the course now points at https://github.com/{repo} (written to {ADDRESS_FILE.name})")
        return 0
    repo = read_address()
    found = disagreements(repo, write=False)
    for path, problems in found.items():
        print(f"{path.relative_to(ROOT)}: " + "; ".join(problems))
    if found:
        print(f"{len(found)} file(s) disagree with https://github.com/{repo} ({ADDRESS_FILE.name}); "
              f"fix them with: python tools/set_repository.py https://github.com/{repo}")
        return 1
    print(f"every badge and setup cell points at https://github.com/{repo}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
