"""Package layering: shared/ (`loram.shared`) depends on nothing else of LoRAM, and the consumer SDK (`loram`)
does not load the publisher toolkit (`loram.publisher`) except where listed below.

The static checks parse the source with `ast` (nothing is imported); the runtime checks import in a fresh
interpreter and inspect `sys.modules`.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"shared": "loram.shared", "consumer": "loram", "publisher": "loram.publisher"}

# consumer modules that may import loram.publisher, each only inside a function (never at import time):
CONSUMER_MAY_IMPORT_PUBLISHER = {
    "consumer/cli.py",   # mounts the `loram publish ...` command group (loram.publisher.cli) on the CLI
    "consumer/demo.py",  # the demo's publish stage lays out and pushes the pruned checkpoint (loram.publisher.push)
}


def _module_name(path: Path) -> tuple[str, bool]:
    """(dotted module name, is a package __init__) of a source file under shared/, consumer/ or publisher/."""
    rel = path.relative_to(ROOT)
    parts = [PACKAGES[rel.parts[0]], *rel.parts[1:-1]]
    is_package = rel.name == "__init__.py"
    if not is_package:
        parts.append(rel.stem)
    return ".".join(parts), is_package


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) for every import in `path`, relative ones resolved.

    `from PKG import a, b` counts as importing PKG.a and PKG.b when PKG is the top-level `loram` (whose
    attributes are its subpackages) or a bare relative package (`from .. import a`), and PKG otherwise; `importlib.import_module("...")` and
    `__import__("...")` with a literal name count too.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    name, is_package = _module_name(path)
    package = name if is_package else name.rpartition(".")[0]
    top_level = set(map(id, tree.body))
    for node in tree.body:  # statements nested in module-level if/try blocks still run at import
        if isinstance(node, ast.If | ast.Try):
            top_level |= {id(n) for n in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                assert base, f"{path}:{node.lineno}: relative import beyond the top-level package"
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            # `from . import x` and `from loram import x` name modules (or the SDK's attributes) in the names
            submodules = node.module is None or module == "loram"
            targets = [f"{module}.{alias.name}" for alias in node.names] if submodules else [module]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if called in ("import_module", "__import__"):
                targets = [node.args[0].value]
        found += [(t, node.lineno, id(node) in top_level) for t in targets]
    return sorted(found, key=lambda t: t[1])


def _sources(folder: str) -> list[Path]:
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files, f"no Python files under {folder}/"
    return files


def _is_loram(module: str) -> bool:
    return module == "loram" or module.startswith("loram.")


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_import_scanner_sees_every_form_of_import(tmp_path, monkeypatch):
    source = ("import loram\nimport loram.shared.errors as e\nfrom loram import shared, train\n"
              "from loram.publisher.push import push\nfrom . import records\nfrom .. import recover\n"
              "def f():\n    import importlib\n    importlib.import_module('loram.publisher.cli')\n")
    fake = tmp_path / "shared" / "fake.py"
    fake.parent.mkdir()
    fake.write_text(source)
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    assert _imports(fake) == [
        ("loram", 1, True), ("loram.shared.errors", 2, True), ("loram.shared", 3, True), ("loram.train", 3, True),
        ("loram.publisher.push", 4, True), ("loram.shared.records", 5, True), ("loram.recover", 6, True),
        ("importlib", 8, False), ("loram.publisher.cli", 9, False),
    ]


def test_shared_imports_only_loram_shared():
    bad = [f"{path.relative_to(ROOT)}:{line}: imports {module}"
           for path in _sources("shared") for module, line, _ in _imports(path)
           if _is_loram(module) and not _within(module, "loram.shared")]
    assert not bad, "shared/ must not depend on the consumer SDK or the publisher:\n" + "\n".join(bad)


def test_consumer_imports_the_publisher_only_where_allowed_and_only_lazily():
    importers = {}
    for path in _sources("consumer"):
        for module, line, at_import in _imports(path):
            if _within(module, "loram.publisher"):
                importers.setdefault(str(path.relative_to(ROOT)), []).append((module, line, at_import))
    unexpected = {f: uses for f, uses in importers.items() if f not in CONSUMER_MAY_IMPORT_PUBLISHER}
    assert not unexpected, f"consumer modules importing loram.publisher: {unexpected}"
    eager = [f"{f}:{line}: {module}" for f, uses in importers.items() for module, line, at_import in uses if at_import]
    assert not eager, "loram.publisher imported at module level (import it inside the function using it):\n" + \
        "\n".join(eager)
    # a stale exception would silently allow a new dependency: each listed module really needs it today
    assert set(importers) == CONSUMER_MAY_IMPORT_PUBLISHER, sorted(importers)


def _fresh_import(statement: str) -> list[str]:
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT / "tests")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.parametrize("statement", ["import loram.shared.manifest", "import loram"])
def test_light_imports_load_no_transformers_model_code(statement):
    modules = _fresh_import(statement)
    assert statement.split()[-1] in modules
    assert not [m for m in modules if _within(m, "transformers.models")], statement


def test_import_loram_does_not_load_the_publisher():
    modules = _fresh_import("import loram")
    assert "loram" in modules and not [m for m in modules if _within(m, "loram.publisher")]
