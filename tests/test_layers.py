"""The package's import order: every import goes to a lower layer of llmbook/README.md's module map."""

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "llmbook"
# Inside these packages files may import each other; everything else imports strictly downwards.
PACKAGES = ("kernels", "bench", "exercises", "_book")


def _layers() -> dict[str, int]:
    rows = re.findall(r"^\| (\d+) \| `(llmbook[\w.]*)` \|", (PACKAGE / "README.md").read_text(), re.M)
    return {module: int(layer) for layer, module in rows}


def _unit(module: str) -> str:
    """The row of the map a module belongs to: llmbook.kernels.rope -> llmbook.kernels."""
    parts = module.split(".")
    return ".".join(parts[:2])


def _module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
    return ".".join(parts)


def _imports(tree: ast.Module, package: str) -> set[str]:
    """llmbook modules imported anywhere in the file, except under `if TYPE_CHECKING:`."""
    found: set[str] = set()
    skipped = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for inner in ast.walk(node)
    }
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("llmbook")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import: from . / .. of this file's package
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base]).strip(".")
            if base.startswith("llmbook"):
                found.add(base)
                if base == "llmbook":  # from llmbook import data: a module
                    found |= {f"llmbook.{alias.name}" for alias in node.names}
    return found


def _sources() -> dict[str, tuple[str, str]]:
    """module name -> (the package its relative imports start from, source) for every file of llmbook."""
    sources = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        sources[name] = (package, path.read_text(encoding="utf-8"))
    return sources


def _violations(sources: dict[str, tuple[str, str]]) -> list[str]:
    layers = _layers()
    problems = []
    for name, (package, source) in sources.items():
        unit = _unit(name)
        if unit not in layers:
            problems.append(f"{name} has no row in llmbook/README.md's module map")
            continue
        for imported in sorted(_imports(ast.parse(source), package)):
            target = _unit(imported)
            if target == unit and (target == "llmbook" or target.split(".")[1] in PACKAGES):
                continue
            if target not in layers:
                problems.append(f"{name} imports {imported}, which has no row in the module map")
            elif layers[target] >= layers[unit]:
                problems.append(
                    f"{name} (layer {layers[unit]}) imports {imported} (layer {layers[target]}): "
                    "imports must go to a lower layer"
                )
    return problems


def test_every_import_goes_to_a_lower_layer_of_the_module_map():
    assert _violations(_sources()) == []


def test_the_layer_check_reports_upward_imports_and_unmapped_modules():
    typing_only = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import llmbook.train\n"
    bad = {
        "llmbook.norms": ("llmbook", "def f():\n    from llmbook.train import train\n"),
        "llmbook.attention": ("llmbook", "from llmbook import model\n"),
        "llmbook.position": ("llmbook", typing_only),  # annotations only: allowed
        "llmbook.kernels.rope": ("llmbook.kernels", "from . import _triton\nfrom .. import norms\n"),
        "llmbook.brand_new": ("llmbook", ""),
    }
    assert _violations(bad) == [
        "llmbook.norms (layer 1) imports llmbook.train (layer 10): imports must go to a lower layer",
        "llmbook.attention (layer 1) imports llmbook.model (layer 5): imports must go to a lower layer",
        "llmbook.brand_new has no row in llmbook/README.md's module map",
    ]
