"""The house drawn from the code: folders by pipeline stage, no import circles, the online
path (host → closure → fallback → model) free of training and dataset generation, small
files, no folder holding more than a third of the package."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "neuroscale_coupling"
NAME = PACKAGE.name


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(path: Path, *, top_level: bool) -> set[str]:
    """Package modules imported by ``path`` (module level only with ``top_level``)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            base = node.module
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m in MODULES and m.startswith(NAME)}


def _closure_of(start: str) -> set[str]:
    """Modules loaded, at module level, by importing ``start`` (parents included)."""
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        parts = m.split(".")
        todo += [".".join(parts[:k]) for k in range(1, len(parts))]
        todo += sorted(_imports(MODULES[m], top_level=True))
    return seen


def test_no_import_cycles():
    graph = {m: _imports(p, top_level=True) - {m} for m, p in MODULES.items()}
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError(f"import cycle: {' -> '.join([*stack, m, n])}")
            if n not in state:
                visit(n, [*stack, m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_closure_and_training_never_import_each_other():
    for m, p in MODULES.items():
        deps = _imports(p, top_level=False)
        if m.startswith(f"{NAME}.closure"):
            assert not any(d.startswith(f"{NAME}.training") for d in deps), (m, deps)
        if m.startswith(f"{NAME}.training"):
            assert not any(d.startswith(f"{NAME}.closure") for d in deps), (m, deps)


def test_online_path_avoids_training_and_dataset_generation():
    for start in (
        f"{NAME}.closure.surrogate_closure",
        f"{NAME}.closure.exact",
        f"{NAME}.hosts.dolfinx.problems",
        f"{NAME}.hosts.dolfinx.driver",
    ):
        loaded = _closure_of(start)
        bad = sorted(
            m for m in loaded if m.startswith(f"{NAME}.training") or m.endswith("generate")
        )
        assert not bad, f"{start} loads {bad}"


def test_files_and_folders_stay_small():
    lines = {m: len(p.read_text().splitlines()) for m, p in MODULES.items()}
    big = {m: n for m, n in lines.items() if n > 650}
    assert not big, f"files over 650 lines: {big}"
    total = sum(lines.values())
    folders: dict[str, int] = {}
    for m, n in lines.items():
        parts = m.split(".")
        if len(parts) > 2 or (MODULES[m].name == "__init__.py" and len(parts) > 1):
            folders[parts[1]] = folders.get(parts[1], 0) + n
    heavy = {f: n for f, n in folders.items() if n > total / 3}
    assert not heavy, f"folders over a third of {total} lines: {heavy}"


def test_every_stage_has_its_folder():
    stages = {"cell", "fine", "data", "surrogate", "training", "closure", "hosts"}
    present = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert stages <= present, stages - present
    assert (PACKAGE / "hosts" / "dolfinx" / "__init__.py").is_file()
