"""Dependencies point down: every import of a diffdistill module obeys the layer order of
``diffdistill.LAYERS`` (module-level and function-level imports alike, read with ``ast``)."""

import ast
from pathlib import Path

import pytest

from diffdistill import LAYERS, layer_of

PACKAGE = Path(__file__).resolve().parent.parent / "diffdistill"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(tree: ast.AST) -> list[tuple[int, str, bool]]:
    """(line, module, inside a function) for every import of a diffdistill module."""
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((child.lineno, a.name, in_function) for a in child.names if a.name.split(".")[0] == "diffdistill")
            elif isinstance(child, ast.ImportFrom) and child.module and child.module.split(".")[0] == "diffdistill":
                # `from diffdistill import param` imports the module diffdistill.param
                names = [f"{child.module}.{a.name}" for a in child.names] if child.module == "diffdistill" else [child.module]
                found.extend((child.lineno, name, in_function) for name in names)
            visit(child, nested)

    visit(tree, False)
    return found


def package_of(module: str) -> str:
    return module.rsplit(".", 1)[0] if module.count(".") > 1 else module


def allowed(importer: str, imported: str) -> bool:
    """Lower layers always; the same package's modules too (e.g. methods.dmd2 -> methods.dmd)."""
    if imported == "diffdistill" or package_of(importer) == package_of(imported) or imported.startswith(importer + "."):
        return True
    return layer_of(imported) < layer_of(importer)


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    unplaced = [module_name(p) for p in MODULES if layer_of(module_name(p)) is None]
    assert not unplaced, f"modules missing from diffdistill.LAYERS: {unplaced}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_imports_point_down(path):
    importer = module_name(path)
    wrong = [f"line {line}: {importer} (layer {layer_of(importer)}) imports {name} (layer {layer_of(name)})"
             for line, name, _ in imported_modules(ast.parse(path.read_text())) if not allowed(importer, name)]
    assert not wrong, "\n".join(wrong)


def test_no_function_level_imports_of_our_modules_without_a_reason():
    """Only the command line imports inside functions (so --help answers before torch loads), each line saying so."""
    silent = []
    for path in MODULES:
        lines = path.read_text().splitlines()
        for line, name, in_function in imported_modules(ast.parse(path.read_text())):
            if in_function and "#" not in lines[line - 1]:
                silent.append(f"{module_name(path)}:{line} imports {name} inside a function")
    assert not silent, "\n".join(silent)


def test_the_checker_catches_an_upward_import():
    """The test above can fail: an engine module importing the assembly layer is refused."""
    assert not allowed("diffdistill.engine.trainer", "diffdistill.run")
    assert not allowed("diffdistill.methods.dmd", "diffdistill.engine.trainer")
    assert not allowed("diffdistill.scores", "diffdistill.generator")  # same layer, different module
    assert allowed("diffdistill.methods.dmd2", "diffdistill.methods.dmd")
    assert allowed("diffdistill.run", "diffdistill.engine.trainer")
    tree = ast.parse("def f():\n    from diffdistill.run import train\n")
    assert imported_modules(tree) == [(2, "diffdistill.run", True)]
    assert len(LAYERS) >= 8
