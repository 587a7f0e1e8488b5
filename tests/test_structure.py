"""The package's structure: settings read in one module, no import circles, no reaching into
another module's private names, and the configuration table in step with the settings."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "sllm_store"
GENERATED = ("store_pb2.py",)


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PACKAGE.rglob("*.py")):
        if p.name in GENERATED:
            continue
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = p
    return out


def _walk(node: ast.AST):
    """ast.walk, leaving out ``if TYPE_CHECKING:`` blocks (imports that never run)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            yield from (n for c in child.orelse for n in [c, *_walk(c)])
            continue
        yield child
        yield from _walk(child)


def _imports(path: Path, name: str) -> list[tuple[str, list[str]]]:
    """(module, names) of every import in a file, function-level ones too, made absolute."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in _walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            out.append((base, [a.name for a in node.names]))
    return out


def test_settings_are_read_in_one_module():
    allowed = {"sllm_store.config"}
    aws_or_xdg = re.compile(r"""environ(?:\.get)?\(\s*["'](AWS_|XDG_)|environ\[["'](AWS_|XDG_)""")
    offenders = []
    for name, path in _modules().items():
        if name in allowed:
            continue
        for line in path.read_text().splitlines():
            if ("os.environ" in line or "getenv(" in line) and not aws_or_xdg.search(line):
                offenders.append(f"{path.relative_to(ROOT)}: {line.strip()}")
    for path in (ROOT / "csrc").rglob("*.[ch]*"):
        if "third_party" not in path.parts and "getenv(" in path.read_text():
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, "environment read outside sllm_store/config.py:\n" + "\n".join(offenders)


def test_every_variable_named_is_a_setting():
    from sllm_store.config import VARIABLES

    known = {v.name for v in VARIABLES}
    named: dict[str, str] = {}
    for path in [*PACKAGE.rglob("*.py"), *(ROOT / "docs").glob("*.md"), ROOT / "README.md"]:
        for var in re.findall(r"SLLM_STORE_[A-Z_]*[A-Z]", path.read_text()):
            named.setdefault(var, str(path.relative_to(ROOT)))
    named.pop("SLLM_STORE_DEBUG_BUILD", None)  # setup.py's build option, documented as such
    unknown = {v: where for v, where in named.items() if v not in known}
    assert not unknown, f"variables named but not read by sllm_store.config: {unknown}"


def test_configuration_table_is_generated_from_the_settings():
    from sllm_store.config import variables_table

    doc = (ROOT / "docs" / "configuration.md").read_text()
    m = re.search(r"<!-- BEGIN GENERATED: variables[^>]*-->\n(.*?)<!-- END GENERATED", doc, re.S)
    assert m, "docs/configuration.md lacks the generated variables table"
    assert m.group(1) == variables_table(), "docs/configuration.md is out of date: regenerate its table " \
        "from sllm_store.config.variables_table()"


def test_no_module_imports_private_names_of_another():
    offenders = []
    for name, path in _modules().items():
        for module, names in _imports(path, name):
            if not module.startswith("sllm_store") or module == name:
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if module == "sllm_store.native" or (module == "sllm_store" and name == "sllm_store.native"):
                private = [n for n in private if n != "_C"]  # the core, configured in native.py
            if private:
                offenders.append(f"{name}: from {module} import {', '.join(private)}")
    assert not offenders, "\n".join(offenders)


def test_no_import_circles():
    modules = _modules()
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        for module, names in _imports(path, name):
            targets = [f"{module}.{n}" if f"{module}.{n}" in modules else module for n in names or [""]]
            graph[name].update(t for t in targets if t in modules and t != name)
    cycles: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    # A package's __init__ re-exporting its modules is not a circle of the code's own making.
    cycles = [c for c in cycles if not any(c[i] == c[i + 1].rsplit(".", 1)[0] for i in range(len(c) - 1))]
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("limit", [620])
def test_modules_stay_small(limit):
    big = {str(p.relative_to(ROOT)): n for p in _modules().values()
           if (n := len(p.read_text().splitlines())) > limit}
    assert not big, f"modules over {limit} lines: {big}"


def test_every_package_is_installed():
    """``pip install .`` (not editable) installs the packages pyproject.toml lists: all of them."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in PACKAGE.rglob("__init__.py")}
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"
