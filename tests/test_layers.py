"""Imports only go down the layers (docs/design.md, "Layers"): every `import` in the package, including
the ones inside functions, and every `ff.<name>` used through `import fastformer as ff`, is checked
against the layer order. Static (ast only): nothing is imported or run."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fastformer"

# Rank of each layer, top (0) to bottom. A module may import its own layer and the layers below it.
RANK = {
    "cli": 0,
    "__main__": 0,
    "train": 1,
    "data": 2,
    "models": 2,
    "integrations": 3,
    "nn": 4,
    "optim": 5,
    "ops": 6,
    "kernels": 7,
    "reference": 7,
    "backend": 8,
    "_extension": 8,
    "_profiling": 8,
    "_C": 8,
}
# Same rank, still apart: the reference must run where triton does not, and a kernel knows no reference.
APART = {("reference", "kernels"), ("kernels", "reference")}
# Names the package root re-exports (`ff.cross_entropy`, `from fastformer import get_backend`).
ROOT_NAMES = {
    "cross_entropy": "ops",
    "linear_cross_entropy": "ops",
    "scaled_dot_product_attention": "ops",
    "varlen_attention": "ops",
    "t5_attention": "ops",
    "get_backend": "backend",
    "set_backend": "backend",
    "use_backend": "backend",
}


def _layer_of_module(name: str) -> str | None:
    """'fastformer.ops.attention' -> 'ops'; the package root itself -> None."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else None


def _layer_of_root_name(name: str) -> str | None:
    return name if name in RANK else ROOT_NAMES.get(name)


def _imports(path: Path, module: str):
    """(line, imported layer) for each fastformer import in the file (relative ones resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    aliases = set()  # names bound to the package root (import fastformer as ff)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "fastformer" and a.asname:
                    aliases.add(a.asname)
                elif a.name == "fastformer":
                    aliases.add("fastformer")
                elif a.name.startswith("fastformer."):
                    yield node.lineno, _layer_of_module(a.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source == "fastformer":
                for a in node.names:
                    yield node.lineno, _layer_of_root_name(a.name)
            elif source.startswith("fastformer."):
                yield node.lineno, _layer_of_module(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            yield node.lineno, _layer_of_root_name(node.attr)


def test_imports_only_go_down_the_layers():
    violations, checked = [], 0
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent)
        module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        own = _layer_of_module(module) if path.parent != PACKAGE else path.stem
        if own == "__init__":
            continue  # the package root re-exports every layer
        assert own in RANK, f"{rel}: a layer docs/design.md does not place; add it to RANK here and there"
        for line, layer in _imports(path, module):
            checked += 1
            if layer is None or layer == own:
                continue
            if RANK[layer] < RANK[own] or (own, layer) in APART:
                violations.append(f"{rel}:{line} ({own}) imports the {layer} layer")
    assert checked > 50
    assert not violations, "imports against the layer order (docs/design.md):\n" + "\n".join(violations)
