"""What can be checked mechanically about the repository as a thing someone else picks up: a README of user size,
no reference to documents or data outside the repository, documentation links that lead somewhere, and a licence
that matches the package metadata."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_BYTES = 12 * 1024

# Written in pieces so that this file does not match itself.
OUTSIDE = [
    ".." + "/shared",
    "shared" + "/data",
    "shared" + "/docs",
    "aoanet-reference" + ".md",
    "ARCHITECTURE" + ".md",
]


def tracked_files() -> list[Path]:
    """The files git tracks; outside a git checkout, every file under the root except generated ones."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60
        ).stdout.decode()
        return [ROOT / name for name in out.split("\0") if name]
    except (OSError, subprocess.SubprocessError):
        skip = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache"}
        return [
            p
            for p in ROOT.rglob("*")
            if p.is_file()
            and not skip & set(p.relative_to(ROOT).parts)
            and not any(part.endswith(".egg-info") for part in p.parts)
            and p.relative_to(ROOT).parts[:2] not in {("artifacts", "demo"), ("artifacts", "tmp")}
        ]


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_readme_is_a_users_document():
    size = (ROOT / "README.md").stat().st_size
    assert size <= README_MAX_BYTES, (
        f"README.md is {size:,} bytes, more than {README_MAX_BYTES:,}: keep it a user's document and move details "
        "to docs/"
    )


def test_no_file_refers_to_anything_outside_the_repository():
    found = []
    for path in tracked_files():
        if not path.is_file():  # deleted in the work tree but still tracked
            continue
        data = path.read_bytes()
        for pattern in OUTSIDE:
            if pattern.encode() in data:
                line = data[: data.index(pattern.encode())].count(b"\n") + 1
                found.append(f"{path.relative_to(ROOT)}:{line}: {pattern}")
    assert not found, "references to files outside the repository:\n  " + "\n  ".join(found)


def test_no_section_citations_of_an_outside_document():
    """Numbered sections ("\u00a72.3") were the outside reference notes' citations; the repository's own pages are
    cited by file and section name (docs/model.md, "Decoding")."""
    section = re.compile("\u00a7\\s?[0-9]".encode())
    found = []
    for path in tracked_files():
        if path.is_file():
            data = path.read_bytes()
            for m in section.finditer(data):
                line = data[: m.start()].count(b"\n") + 1
                found.append(f"{path.relative_to(ROOT)}:{line}")
    assert not found, "numbered section citations:\n  " + "\n  ".join(found)


# ------------------------------------------------------------------------------------------------ links
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (hyphens and underscores kept), spaces as
    hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = text.replace("`", "").strip().lower()
    text = "".join(ch for ch in text if ch.isalnum() or ch in " -_")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    out = set()
    for heading in HEADING.findall(text):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def relative_links(path: Path) -> list[str]:
    text = INLINE_CODE.sub("", FENCE.sub("", path.read_text(encoding="utf-8")))
    return [t for t in LINK.findall(text) if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I)]


def test_markdown_files_are_there():
    names = {p.name for p in markdown_files()}
    for page in ("model.md", "export-format.md", "benchmarks.md", "gpu.md", "distributed.md", "int8.md"):
        assert page in names, f"docs/{page} is missing"


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_leads_somewhere(path):
    broken = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{target}: {dest} does not exist")
            continue
        try:
            dest.relative_to(ROOT)
        except ValueError:
            broken.append(f"{target}: outside the repository")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with the anchor #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{path.relative_to(ROOT)}:\n  " + "\n  ".join(broken)


def test_link_checker_sees_links_and_anchors(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "# A page\n\n## Faithfulness: what differs, and `why`\n\nSee [it](#faithfulness-what-differs-and-why), "
        "[the other](other.md#x), [web](https://example.org) and `[not a link](code.md)`.\n\n"
        "```\n[also not](fenced.md)\n```\n",
        encoding="utf-8",
    )
    assert relative_links(page) == ["#faithfulness-what-differs-and-why", "other.md#x"]
    assert anchors(page) == {"a-page", "faithfulness-what-differs-and-why"}


# ------------------------------------------------------------------------------------------------ licence
def test_license_matches_the_package_metadata():
    license_file = ROOT / "LICENSE"
    assert license_file.is_file(), "LICENSE is missing"
    text = license_file.read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text, "LICENSE is not the Apache-2.0 text"
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        project = {
            "license": re.search(r'^license\s*=\s*"([^"]*)"', pyproject, re.M).group(1),
            "license-files": re.findall(r'"([^"]+)"', re.search(r"^license-files\s*=\s*\[(.*?)\]", pyproject,
                                                                   re.M | re.S).group(1)),
        }
    else:
        project = tomllib.loads(pyproject)["project"]
    assert project["license"] == "Apache-2.0"
    assert "LICENSE" in project["license-files"]
