"""Hashes that make Snakemake's cache trustworthy.

Snakemake reruns a job when its `params` change but cannot see edits inside an imported package.
`code_hash("pipeline.generate")` hashes the source of that module and of every `pipeline` module it
imports, transitively, found by parsing (not importing) the files, so the Snakefile stays fast to parse.

The config schema is not code here: its defaults reach a stage as config values, which the rule's
params carry already, and the rest of it (descriptions, bounds) changes no output.
"""

from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

from pipeline.config import stable_json

PACKAGE_DIR = Path(__file__).resolve().parent
PACKAGE = PACKAGE_DIR.name


def _module_file(module: str) -> Path | None:
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    base = PACKAGE_DIR.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_modules(path: Path) -> set[str]:
    """`pipeline.*` modules imported anywhere in the file (including inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from pipeline import generate` imports the submodule pipeline.generate
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {m for m in found if m.split(".")[0] == PACKAGE}


def module_closure(module: str) -> list[Path]:
    """Source files of `module` and every pipeline module it imports, transitively, sorted."""
    seen: dict[str, Path] = {}
    stack = [module, PACKAGE]  # the package __init__ runs before any submodule
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        path = _module_file(name)
        if path is None:
            continue
        seen[name] = path
        stack.extend(_imported_modules(path))
        # importing pipeline.a.b runs pipeline/a/__init__.py first
        stack.extend(name.rsplit(".", depth)[0] for depth in range(1, name.count(".")))
    if module not in seen:
        raise ValueError(f"no source file for module {module!r} under {PACKAGE_DIR}")
    return sorted(set(seen.values()))


@lru_cache(maxsize=None)
def code_hash(module: str) -> str:
    """sha256 (first 16 hex digits) over the source files `module` depends on."""
    digest = hashlib.sha256()
    for path in module_closure(module):
        digest.update(path.relative_to(PACKAGE_DIR).as_posix().encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def value_hash(value) -> str:
    """sha256 (first 16 hex digits) of a JSON-able value, independent of dict order."""
    return hashlib.sha256(stable_json(value).encode()).hexdigest()[:16]
