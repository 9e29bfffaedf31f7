"""The package's shape: imports run down the layers of docs/architecture.md, the import graph has
no cycles, and no function outside the training loop is longer than 60 lines."""
import ast
import importlib
import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "pdpo_jax"
LONG_FUNCTION_ALLOWED = {("pdpo_jax.train.loop", "run")}  # the loop dispatches and keeps books
MAX_FUNCTION_LINES = 60


def layer_table() -> list[tuple[int, list[str]]]:
    """(layer, module patterns) rows of the table under the `layers:` marker in the docs."""
    text = (REPO / "docs" / "architecture.md").read_text()
    block = text.split("<!-- layers:", 1)[1].split("\n\n", 1)[0]
    rows = []
    for line in block.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].isdigit():
            rows.append((int(cells[0]), re.findall(r"`([\w.*]+)`", cells[2])))
    assert rows, "docs/architecture.md lost its layer table"
    return rows


def modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def layer_of(module: str, table) -> int | None:
    """The layer of the most specific matching entry: the exact name, else the longest `x.*`."""
    best, best_len = None, -1
    for layer, patterns in table:
        for pattern in patterns:
            if pattern == module:
                return layer
            base = pattern.removesuffix(".*")
            if pattern.endswith(".*") and (module == base or module.startswith(base + ".")):
                if len(base) > best_len:
                    best, best_len = layer, len(base)
    return best


def _lazy_target(package: str, name: str) -> str | None:
    exports = getattr(importlib.import_module(package), "__lazy_exports__", {})
    return exports.get(name)


def imports_of(module: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """The package modules `module` imports anywhere in its file (function-local imports too),
    `from pkg import name` resolved to the submodule that defines `name`."""
    tree = ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "pdpo_jax"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module if is_package else module.rsplit(".", 1)[0]
                for _ in range(node.level - 1):
                    anchor = anchor.rsplit(".", 1)[0]
                base = f"{anchor}.{base}" if base else anchor
            if base.split(".")[0] != "pdpo_jax":
                continue
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.add(full if full in known else _lazy_target(base, alias.name) or base)
    out.discard(module)
    return out


def test_every_module_has_a_layer():
    table = layer_table()
    missing = [m for m in modules() if layer_of(m, table) is None]
    assert not missing, f"add these modules to the layer table of docs/architecture.md: {missing}"


def test_imports_run_down_the_layers():
    table, mods = layer_table(), modules()
    upward = []
    for module, path in mods.items():
        mine = layer_of(module, table)
        for target in imports_of(module, path, set(mods)):
            theirs = layer_of(target, table)
            if theirs is not None and mine is not None and theirs > mine:
                upward.append(f"{module} (layer {mine}) imports {target} (layer {theirs})")
    assert not upward, "\n".join(upward)


def test_import_graph_has_no_cycles():
    mods = modules()
    graph = {m: imports_of(m, p, set(mods)) & set(mods) for m, p in mods.items()}
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(node, trail):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if nxt.startswith(node + "."):  # a package importing its own submodule
                continue
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(trail + [node, nxt]))
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_functions_are_short():
    long = []
    for module, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES and (module, node.name) not in LONG_FUNCTION_ALLOWED:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "split these functions:\n" + "\n".join(long)


def test_layer_check_catches_an_upward_import(tmp_path):
    """The checker itself: a layer-2 module importing a layer-6 one is reported."""
    table = layer_table()
    fake = tmp_path / "fake.py"
    fake.write_text("def f():\n    from pdpo_jax.train.stages import run_sft\n")
    targets = imports_of("pdpo_jax.models.fake", fake, set(modules()))
    assert targets == {"pdpo_jax.train.stages"}
    assert layer_of("pdpo_jax.models.fake", table) < layer_of("pdpo_jax.train.stages", table)
