"""The import layers of src/dcq (docs/architecture.md, "Layers"): no import cycle, no import from a
lower layer to a higher one, evaluation and deployment never import each other's commands.

Every ``import`` / ``from ... import`` statement counts, also those inside functions and under
``if TYPE_CHECKING:`` (a lazy import is still a dependency, and a cycle through one still breaks
as soon as both functions run)."""

import ast
import re
from fnmatch import fnmatchcase
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "dcq"
DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"

# Bottom layer first. A module belongs to the first layer, searched from the top, with a pattern
# matching its dotted name; it may import its own layer and the layers below.
LAYERS: list[tuple[str, list[str]]] = [
    ("foundation", ["dcq.errors", "dcq.atomic", "dcq.checksum", "dcq.seeds", "dcq.lazy", "dcq.tables",
                    "dcq.resources", "dcq.distributed", "dcq.autocast", "dcq.lock"]),
    ("data and networks", ["dcq.align", "dcq.data", "dcq.data.*", "dcq.models", "dcq.models.*", "dcq.heads",
                           "dcq.heads.*", "dcq.momentum"]),
    ("model and embedding files", ["dcq.checkpoint", "dcq.convert", "dcq.encoders", "dcq.deploy", "dcq.deploy.*"]),
    ("evaluation", ["dcq.eval", "dcq.eval.*"]),
    ("training", ["dcq.train", "dcq.train.*"]),
    ("commands", ["dcq", "dcq.__main__", "dcq.cli", "dcq.eval.cli", "dcq.eval.protocol_cli", "dcq.deploy.*_cli",
                  "dcq.train.cli", "dcq.bench", "dcq.bench.*", "dcq.experiment", "dcq.demo", "dcq.export"]),
]

# (importer, imported) patterns that the layers alone would allow but that must not exist.
FORBIDDEN = [
    ("dcq.eval.*", "dcq.deploy.*_cli"),  # evaluation never imports deployment's commands ...
    ("dcq.deploy.*", "dcq.eval.cli"),  # ... and deployment never imports evaluation's
    ("dcq.deploy.*", "dcq.eval.protocol_cli"),
]


def module_files(src: Path = SRC) -> dict[str, Path]:
    out = {}
    for path in sorted(src.rglob("*.py")):
        parts = list(path.relative_to(src.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _owner(name: str, modules: dict) -> str | None:
    """The module ``name`` lives in (a name imported from a package is the package's)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the dcq modules it imports anywhere in its file (functions included)."""
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps |= {_owner(a.name, modules) for a in node.names if a.name.split(".")[0] == "dcq"}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                if source.split(".")[0] != "dcq":
                    continue
                for alias in node.names:
                    full = f"{source}.{alias.name}"
                    deps.add(full if full in modules else _owner(source, modules))
        graph[name] = {d for d in deps if d and d != name}
    return graph


def layer_of(module: str) -> int | None:
    for level in range(len(LAYERS) - 1, -1, -1):
        if any(fnmatchcase(module, pattern) for pattern in LAYERS[level][1]):
            return level
    return None


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def violations(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for module, deps in sorted(graph.items()):
        for dep in sorted(deps):
            if layer_of(dep) > layer_of(module):
                out.append(f"{module} ({LAYERS[layer_of(module)][0]}) imports {dep} ({LAYERS[layer_of(dep)][0]})")
            for importer, imported in FORBIDDEN:
                if fnmatchcase(module, importer) and fnmatchcase(dep, imported):
                    out.append(f"{module} imports {dep}: forbidden ({importer} -> {imported})")
    return out


GRAPH = import_graph(module_files())


def test_every_module_has_a_layer():
    assert [m for m in GRAPH if layer_of(m) is None] == []


def test_no_import_cycle():
    assert cycles(GRAPH) == []


def test_no_import_from_a_lower_layer_to_a_higher_one():
    assert violations(GRAPH) == []


def test_the_checks_catch_a_cycle_an_upward_import_and_a_lazy_import(tmp_path):
    pkg = tmp_path / "dcq"
    (pkg / "eval").mkdir(parents=True)
    (pkg / "deploy").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "errors.py").write_text("def f():\n    import dcq.eval\n")  # lazy and upward
    (pkg / "eval" / "__init__.py").write_text("")
    (pkg / "eval" / "cli.py").write_text("from dcq.deploy.gallery_cli import x\n")
    (pkg / "deploy" / "__init__.py").write_text("")
    (pkg / "deploy" / "gallery_cli.py").write_text("from ..eval.cli import y\nfrom .. import errors\n")
    graph = import_graph(module_files(pkg))
    assert graph["dcq.errors"] == {"dcq.eval"}
    assert graph["dcq.deploy.gallery_cli"] == {"dcq.eval.cli", "dcq.errors"}
    assert cycles(graph) == [["dcq.deploy.gallery_cli", "dcq.eval.cli"]]
    found = violations(graph)
    assert "dcq.errors (foundation) imports dcq.eval (evaluation)" in found
    assert any("dcq.eval.cli imports dcq.deploy.gallery_cli: forbidden" in v for v in found)
    assert any("dcq.deploy.gallery_cli imports dcq.eval.cli: forbidden" in v for v in found)


def documented_layers(text: str) -> list[tuple[str, list[str], set[str]]]:
    """(name, patterns, module files) of each numbered layer of docs/architecture.md's "Layers" section:
    ``N. **name**: `pattern` `pattern` ...`` then indented lines of file paths under src/dcq."""
    section = text.split("\n## Layers", 1)[1].split("\n## ", 1)[0]
    layers = []
    for line in section.splitlines():
        head = re.match(r"(\d+)\. \*\*(.+?)\*\*", line)
        if head:
            layers.append((head.group(2), re.findall(r"`([^`]+)`", line), set()))
        elif layers and line.startswith("   ") and line.strip():
            layers[-1][2].update(w.strip(",.") for w in line.split() if w.strip(",.").endswith(".py"))
    return layers


def test_docs_write_the_layers_and_list_every_module_in_its_layer():
    layers = documented_layers(DOC.read_text())
    assert [(name, patterns) for name, patterns, _ in layers] == LAYERS
    modules = module_files()
    where = {path.relative_to(SRC).as_posix(): layer_of(name) for name, path in modules.items()}
    listed = {f: k for k, (_, _, files) in enumerate(layers) for f in files}
    assert sorted(set(where) - set(listed)) == []  # every module is listed ...
    assert sorted(set(listed) - set(where)) == []  # ... and nothing that does not exist
    assert {f: k for f, k in listed.items() if where[f] != k} == {}  # ... in the layer it belongs to
