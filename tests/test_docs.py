"""Every ```python block in README.md and docs/*.md runs, so the docs cannot rot.

Blocks of one file run in order in one namespace (a tutorial may build on its earlier blocks), inside a
temporary working directory. A block whose first line is ``# doc-test: skip`` is shown but not run (use it
only for code that needs a GPU or a download, and say why on that line).
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
