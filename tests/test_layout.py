"""The import rules of the layout (see the README's "The code" section): `indexer` never imports
`search`, no two modules import each other (directly or round a longer loop), and each
third-party engine is imported by its own module(s) only.

Imports under `if TYPE_CHECKING:` are left out: they name types for readers and never run."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("indexer", "search")

# engine → the modules allowed to import it, and why more than one where there are more
ENGINES = {
    # the exporter traces the torch model; JPEGs decode on the GPU into torch tensors; BLIP's
    # image-text matching re-ranks with transformers' torch model
    "torch": {
        "indexer.models.encoder",
        "indexer.models.onnx_export",
        "indexer.models.gpu_jpegs",
        "indexer.models.blip_matcher",
    },
    "transformers": {"indexer.models.blip_matcher"},  # BLIP's model, tokenizer and image processor
    "torchvision": {"indexer.models.gpu_jpegs"},  # its nvJPEG decoder
    "open_clip": {"indexer.models.encoder", "indexer.models.onnx_export"},
    "huggingface_hub": {"indexer.models.hub"},  # the hub's cache and downloads, without torch
    "tokenizers": {"indexer.models.hf_tokenizer"},
    "onnxruntime": {"indexer.models.onnx_encoder", "indexer.models.onnx_export"},  # the export quantises with it
    "faiss": {"indexer.store.vectors"},
    # the catalog's reads, its writes, and its schema with what each database spells its own way
    "sqlalchemy": {"indexer.store.catalog", "indexer.store.catalog_writer", "indexer.store.catalog_schema"},
    "ray": {"indexer.ray.pipeline"},
    "pyarrow": {"indexer.ray.shards", "indexer.sources.remote"},  # Parquet shards; object stores' file systems
    "fastapi": {
        "search.http.app",
        "search.http.context",
        "search.http.knn_service",
        "search.http.strict_input",  # the route class that reads requests strictly
        "search.http.uploads",  # the ASGI middleware that watches request bodies
    },
    "starlette": {"search.http.uploads"},
    "uvicorn": {"search.cli.serve_command"},
}
ENGINE_PREFIXES = {"click": "search.cli.", "pydantic": "search.http."}  # a layer's own framework


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(module: str) -> set[str]:
    """Every module name `module` imports at run time, with `from package import module` resolved."""
    path = MODULES[module]
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return names


IMPORTS = {module: _imports(module) for module in MODULES}


def test_the_layout_has_the_layers_as_folders():
    for folder in ("indexer/models", "indexer/sources", "indexer/store", "indexer/ray", "search/cli", "search/http"):
        assert (ROOT / folder / "__init__.py").is_file(), folder


def test_indexer_never_imports_search():
    offenders = {
        module: sorted(name for name in names if name.split(".")[0] == "search")
        for module, names in IMPORTS.items()
        if module.startswith("indexer")
    }
    assert {module: names for module, names in offenders.items() if names} == {}


def test_no_modules_import_each_other():
    graph = {
        module: {name for name in names if name in MODULES and name != module} for module, names in IMPORTS.items()
    }
    cycles, state = [], {}

    def walk(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for name in sorted(graph[module]):
            if state.get(name) == "open":
                cycles.append(" → ".join([*trail[trail.index(name) :], name]))
            elif name not in state:
                walk(name, [*trail, name])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            walk(module, [module])
    assert cycles == []


@pytest.mark.parametrize("engine", sorted([*ENGINES, *ENGINE_PREFIXES]))
def test_each_engine_has_its_own_importers(engine):
    importers = {module for module, names in IMPORTS.items() if any(name.split(".")[0] == engine for name in names)}
    assert importers, f"nothing imports {engine}: the rule is stale"
    if engine in ENGINES:
        assert importers <= ENGINES[engine]
    else:
        assert all(module.startswith(ENGINE_PREFIXES[engine]) for module in importers), sorted(importers)


def test_the_cycle_check_sees_a_loop():
    """The check above on a made-up pair, so that it cannot pass by seeing nothing."""
    saved = dict(IMPORTS)
    try:
        IMPORTS["indexer.errors"] = IMPORTS["indexer.errors"] | {"indexer.config"}
        IMPORTS["indexer.config"] = IMPORTS["indexer.config"] | {"indexer.errors"}
        with pytest.raises(AssertionError, match=re.escape("indexer.config → indexer.errors → indexer.config")):
            test_no_modules_import_each_other()
    finally:
        IMPORTS.clear()
        IMPORTS.update(saved)
