"""Every ```python block in README.md and docs/*.md runs and every relative link resolves, so the docs
cannot rot.

Blocks of one file run in order in one namespace (a tutorial may build on its earlier blocks), inside a
temporary working directory. A block whose first line is ``# doc-test: skip`` is shown but not run (use it
only for code that needs a GPU or a download, and say why on that line).

Links: every ``[text](target)`` outside code in README.md, docs/**/*.md and benchmarks/*.md that is not a
URL must name an existing file, and a ``#fragment`` into a Markdown file must be one of its headings' anchors
(GitHub's rule: lower case, punctuation but ``-`` and ``_`` dropped, spaces to ``-``, ``-1``, ``-2`` for
repeats), so moving a section to another page cannot leave a dangling link behind.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOC_FILES = sorted([REPO / "README.md", *(REPO / "docs").rglob("*.md")])
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def python_blocks(path: Path) -> list[str]:
    blocks = PYTHON_BLOCK.findall(path.read_text())
    return [block for block in blocks if not block.startswith("# doc-test: skip")]


DOCS_WITH_CODE = [p for p in DOC_FILES if python_blocks(p)]


@pytest.mark.parametrize("path", DOCS_WITH_CODE, ids=lambda p: str(p.relative_to(REPO)))
def test_doc_snippets_run(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace: dict[str, object] = {"__name__": f"doc_{path.stem}"}
    for index, block in enumerate(python_blocks(path)):
        code = compile(block, f"{path.relative_to(REPO)} [python block {index + 1}]", "exec")
        exec(code, namespace)


def test_snippet_extraction_finds_blocks(tmp_path: Path) -> None:
    doc = tmp_path / "x.md"
    fence = "```"
    doc.write_text(
        f"text\n{fence}python\nx = 1\n{fence}\n{fence}bash\nls\n{fence}\n"
        f"{fence}python\n# doc-test: skip (GPU)\ny\n{fence}\n"
    )
    assert python_blocks(doc) == ["x = 1\n"]


LINK_FILES = sorted([*DOC_FILES, *(REPO / "benchmarks").glob("*.md")])
FENCED = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def heading_anchors(path: Path) -> set[str]:
    """The ``#fragment`` GitHub gives each heading of ``path`` (fenced code is not a heading)."""
    anchors: set[str] = set()
    for heading in HEADING.findall(FENCED.sub("", path.read_text())):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchor, n = slug, 0
        while anchor in anchors:
            n += 1
            anchor = f"{slug}-{n}"
        anchors.add(anchor)
    return anchors


def broken_links(path: Path) -> list[str]:
    """Relative link targets in ``path`` whose file is missing or whose Markdown anchor does not exist."""
    text = INLINE_CODE.sub("", FENCED.sub("", path.read_text()))
    broken = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        file, _, fragment = target.partition("#")
        dest = (path.parent / file) if file else path
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif fragment and dest.suffix == ".md" and fragment not in heading_anchors(dest):
            broken.append(f"{target} (no heading with that anchor)")
    return broken


@pytest.mark.parametrize("path", LINK_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_doc_links_resolve(path: Path) -> None:
    assert broken_links(path) == []


def test_link_check_finds_missing_files_and_anchors(tmp_path: Path) -> None:
    other = "# Other page\n\n## 6. The CPU path: two cores\n\n## Notes\n\n## Notes\n"
    (tmp_path / "other.md").write_text(other)
    doc = tmp_path / "x.md"
    doc.write_text(
        "# Title\n[a](other.md#6-the-cpu-path-two-cores) [b](other.md#notes-1) [c](#title) [d](https://x.org/#y)\n"
        "[e](gone.md) [f](other.md#7-moved) [g](#nowhere)\n`[h](in-code.md)`\n```\n[i](in-fence.md)\n```\n"
    )
    assert broken_links(doc) == [
        "gone.md (no such file)", "other.md#7-moved (no heading with that anchor)",
        "#nowhere (no heading with that anchor)",
    ]  # fmt: skip
