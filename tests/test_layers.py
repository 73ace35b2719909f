"""The package layering of docs/ARCHITECTURE.md, checked on the source: no module imports one above it.

Every `import tessera...` / `from tessera... import` in the package counts, at module top or inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tessera"

# bottom to top; a unit may import its own layer and the ones below (docs/ARCHITECTURE.md, "Packages")
LAYERS: list[set[str]] = [
    {"geometry", "config", "seeds", "auc", "logprobs", "device"},
    {"world", "chat", "image"},
    {"data", "model"},
    {"routing", "engine"},
    {"answers", "pipeline", "best_of_n", "evaluate", "evaluate_records", "flash_table", "tessera"},
    {"serve", "train"},
    {"bench", "commands", "cli"},
]
# same-layer pairs that must stay apart: inference never imports training, serving and training are separate
FORBIDDEN = {("serve", "train"), ("train", "serve"), ("data", "model"), ("model", "data")}


def unit_of(module: str) -> str:
    """`tessera.serve.api` → `serve`; `tessera.pipeline` → `pipeline`; `tessera` → `tessera` (the root)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "tessera"


def layer_of(unit: str) -> int:
    for i, units in enumerate(LAYERS):
        if unit in units:
            return i
    raise AssertionError(
        f"tessera.{unit} is in no layer: add it to LAYERS and docs/ARCHITECTURE.md"
    )


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported tessera module) for every import statement in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "tessera":
                found += [(node.lineno, f"tessera.{a.name}") for a in node.names]
            elif node.module.startswith("tessera."):
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [
                (node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "tessera"
            ]
    return found


def source_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def module_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.parts[-1] == "__init__" else rel.parts
    return ".".join(parts)


def test_every_unit_has_a_layer():
    for path in source_files():
        layer_of(unit_of(module_of(path)))


@pytest.mark.parametrize("path", source_files(), ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_no_upward_import(path: Path):
    src = unit_of(module_of(path))
    bad = []
    for line, target in imports(path):
        dst = unit_of(target)
        if dst == "tessera" or dst == src:
            continue
        # `from tessera import load` names an attribute of the root, which sits at the inference layer
        dst_layer = layer_of(dst) if any(dst in units for units in LAYERS) else layer_of("tessera")
        if dst_layer > layer_of(src) or (src, dst) in FORBIDDEN:
            bad.append(
                f"{path.name}:{line} imports {target} (tessera.{src} may not import tessera.{dst})"
            )
    assert not bad, "\n".join(bad)


def test_the_checker_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from tessera.train.trainer import Trainer\n")
    assert imports(bad) == [(2, "tessera.train.trainer")]
    assert layer_of(unit_of("tessera.train.trainer")) > layer_of(unit_of("tessera.engine.generate"))
