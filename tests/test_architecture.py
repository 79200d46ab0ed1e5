"""The import structure is the architecture (docs/architecture.md): every module imports only from its own
layer or the layers below it, and no modules import each other in a circle. Read from the source with
``ast`` (lazy imports inside functions count too), so a back edge fails here, not in a reviewer's head."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Layer of each package or top-level module, bottom (0) to top; docs/architecture.md draws the same rows.
LAYERS = {
    "lora_core.atomic": 0,
    "lora_core.one_line_parser": 0,
    "lora_core.native": 0,
    "lora_core.quant": 1,
    "lora_core.kernels": 2,
    "lora_core.dispatch": 3,
    "lora_core.lora": 4,
    "lora_core.models": 5,
    "lora_core.training": 5,
    "lora_core.inference": 5,
    "lora_core": 6,  # the package's __init__: the public API, gathered from the layers below
    "lora_core.bench": 7,
    "lora_core.cli": 8,
}


def module_files() -> dict[str, Path]:
    """Every module of the installed package: ``lora_core/**`` and ``kernels/`` (as ``lora_core.kernels``)."""
    found = {}
    for root, name in ((REPO / "lora_core", "lora_core"), (REPO / "kernels", "lora_core.kernels")):
        for path in root.rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([name, *parts])] = path
    return found


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """The project modules ``name`` imports (``from pkg import mod`` is the module ``mod`` when it is one)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in modules and t != name}
    return out


def layer_of(module: str) -> int:
    best = max((k for k in LAYERS if module == k or module.startswith(k + ".")), key=len)
    return LAYERS[best]


def graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def test_every_module_has_a_layer() -> None:
    for module in graph():
        assert any(module == k or module.startswith(k + ".") for k in LAYERS), f"{module}: add it to LAYERS"


def test_no_import_runs_up_a_layer() -> None:
    back = [
        f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})"
        for m, targets in graph().items()
        for t in targets
        if layer_of(t) > layer_of(m)
    ]
    assert not back, "\n".join(back)


def test_no_import_circle() -> None:
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join([*path[path.index(nxt) :], nxt]))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])


def test_the_checker_sees_a_back_edge_and_a_circle(tmp_path: Path) -> None:
    """The checks above can fail: a planted upward import and a planted circle are both found."""
    (tmp_path / "a.py").write_text("from lora_core.cli import main\nimport lora_core.b\n")
    (tmp_path / "b.py").write_text("def f():\n    from lora_core.a import g\n")
    modules = {"lora_core.a", "lora_core.b", "lora_core.cli"}
    a = imports_of("lora_core.a", tmp_path / "a.py", modules)
    b = imports_of("lora_core.b", tmp_path / "b.py", modules)
    assert a == {"lora_core.cli", "lora_core.b"} and b == {"lora_core.a"}
    assert layer_of("lora_core.cli") > layer_of("lora_core.quant.nf4")
