"""The package's layers import only downward, read from the import graph of every module.

memory -> kv -> hf -> engine -> broker, bench, parallel (testing beside them) -> serve; ``_native`` (the compiled
core's loader) is below them all, and ``__main__`` (the subcommand table) above them all.
"""

from __future__ import annotations

import ast
from pathlib import Path

import torch_elastic_kv

PACKAGE = Path(torch_elastic_kv.__file__).resolve().parent
RANK = {
    "_C": -1,
    "_native": 0,
    "_util": 0,
    "_units": 0,
    "memory": 1,
    "kv": 2,
    "hf": 3,
    "engine": 4,
    "broker": 5,
    "bench": 5,
    "testing": 5,
    "parallel": 5,
    "serve": 6,
    "__main__": 7,
}


def _layer(module: str) -> str:
    """Layer of a dotted module under the package ('' for the package itself)."""
    return module.split(".")[0]


def _from_package(names: list[str]) -> list[str]:
    """Modules that ``from torch_elastic_kv import names`` reaches: a public name is its defining
    module (the package's lazy table), anything else a module or attribute of the package."""
    exports = torch_elastic_kv._EXPORTS
    return [exports.get(n, "" if n.startswith("__") else n) for n in names]


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module under the package) for every import of the package in ``path``."""
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = list(rel.parts)
    pkg = parts[:-1]  # the package a relative import starts from (for __init__ too)
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - (node.level - 1)] if node.level > 1 else pkg
                target = [*base, *(node.module.split(".") if node.module else [])]
                if not node.module:  # "from . import x": x are modules (or public names) of base
                    if base:
                        found += [(node.lineno, ".".join([*base, a.name])) for a in node.names]
                    else:
                        found += [(node.lineno, m) for m in _from_package([a.name for a in node.names])]
                    continue
                found.append((node.lineno, ".".join(target)))
            elif node.module and (node.module == "torch_elastic_kv" or node.module.startswith("torch_elastic_kv.")):
                rest = node.module.split(".")[1:]
                if rest:
                    found.append((node.lineno, ".".join(rest)))
                else:
                    found += [(node.lineno, m) for m in _from_package([a.name for a in node.names])]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("torch_elastic_kv."):
                    found.append((node.lineno, a.name.split(".", 1)[1]))
    return found


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0] != "_testing")


def test_every_module_belongs_to_a_layer() -> None:
    stray = [
        str(p.relative_to(PACKAGE))
        for p in _modules()
        if p.name != "__init__.py" or p.parent != PACKAGE
        if _layer(".".join(p.relative_to(PACKAGE).with_suffix("").parts)) not in RANK
    ]
    assert stray == [], f"modules outside every layer: {stray}"


def _violations(path: Path) -> list[str]:
    rel = path.relative_to(PACKAGE)
    own = _layer(".".join(rel.with_suffix("").parts))
    bad = []
    for line, target in _imports(path):
        other = _layer(target)
        if other == "" or other == own:
            continue
        if other not in RANK or RANK[other] >= RANK[own]:
            bad.append(f"{rel}:{line} ({own}) imports {target} ({other})")
    return bad


def test_layers_import_only_downward() -> None:
    # The package's own __init__ is its lazy table of public names: it reaches every layer.
    bad = [v for path in _modules() if path.relative_to(PACKAGE) != Path("__init__.py") for v in _violations(path)]
    assert bad == [], "imports against the layering:\n" + "\n".join(bad)


def test_the_checker_sees_a_violation() -> None:
    # Relative, absolute and public-name imports alike, or the test above proves nothing.
    probe = PACKAGE / "memory" / "_layering_probe.py"
    probe.write_text(
        "from ..engine import engine\nfrom torch_elastic_kv.hf import cache\n"
        "from torch_elastic_kv import Engine\nfrom .arena import Arena\n"
    )
    try:
        assert [t for _, t in _imports(probe)] == ["engine", "hf", "engine.engine", "memory.arena"]
        assert len(_violations(probe)) == 3, _violations(probe)
    finally:
        probe.unlink()
