"""The architecture as the code states it: imports read from every file (inside functions and under
TYPE_CHECKING too) form no circle and point down the layers; no function runs over 80 lines."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGES = ("model", "app", "tools", "cli", "skingpt_vllm")
# who may import whom, by top-level package (model: the library; app: the server; tools and cli on top)
ALLOWED = {"model": {"model"}, "app": {"app", "model"}, "tools": {"tools", "model", "app"},
           "cli": {"cli", "model", "app", "tools"},
           # the vLLM plugin runs in vLLM's environment (no timm, no torchvision): of ours it takes only
           # the preprocessing and its config (test_the_vllm_plugin_imports_only_what_vllms_environment_has)
           "skingpt_vllm": {"skingpt_vllm", "model"}}
# inside the library, each folder imports only folders listed before it
LIBRARY_LAYERS = ("errors", "choices", "metrics", "i18n", "nn", "images", "prompt", "clinical", "visits", "weights", "serving", "evaluation", "training")
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")] + [ROOT / "launch.py"]
    out = {}
    for path in files:
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def test_imports_form_no_circle_and_point_down_the_layers():
    known = _modules()
    graph = {name: _imports(name, path, known) for name, path in known.items()}
    for name, targets in graph.items():
        top = name.split(".")[0]
        if top in ALLOWED:
            wrong = sorted(t for t in targets if t.split(".")[0] not in ALLOWED[top])
            assert not wrong, f"{name} imports {wrong}"
        if top == "model" and name != "model":
            layer = LIBRARY_LAYERS.index(name.split(".")[1])
            above = sorted(t for t in targets if t.startswith("model.")
                           and LIBRARY_LAYERS.index(t.split(".")[1]) > layer)
            assert not above, f"{name} imports {above}, a layer above its own"
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(nxt):] + [node, nxt]))
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_the_library_never_imports_the_web_stack():
    known = _modules()
    for name, path in known.items():
        if name.split(".")[0] == "model":
            tree = ast.parse(path.read_text())
            roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
            roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
            assert not roots & {"gradio", "fastapi", "argparse"}, f"{name} imports {roots & {'gradio', 'fastapi'}}"


def test_no_function_is_over_80_lines():
    long = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, long


def test_the_vllm_plugin_imports_only_what_vllms_environment_has():
    known = _modules()
    ours = {t for name, path in known.items() if name.startswith("skingpt_vllm")
            for t in _imports(name, path, known) if t.startswith("model")}
    assert ours <= {"model.images.preprocess", "model.nn.config"}, ours
    for target in ours:  # and those import nothing that needs timm or torchvision at import time
        tree = ast.parse(known[target].read_text())
        top = {a.name.split(".")[0] for n in tree.body if isinstance(n, ast.Import) for a in n.names}
        top |= {n.module.split(".")[0] for n in tree.body if isinstance(n, ast.ImportFrom) and n.module}
        assert not top & {"timm", "torchvision"}, (target, top)
