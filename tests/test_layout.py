"""The architecture as the code states it: imports read from every file (inside functions and under
TYPE_CHECKING too) form no circle and point down the layers; no function runs over 60 lines; each
decision is written once (photos taken in through model.images.intake, the quantisation modes listed
in model.choices, engines and runners used through their contracts, never probed)."""

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
MAX_FUNCTION_LINES = 60


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


def test_no_function_is_over_60_lines():
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


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            yield node, func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


DECODERS = {"decode_photo", "read_photo_file", "read_image_file", "check_photo_file"}


def test_the_front_ends_take_photos_in_through_the_one_intake():
    """The page, the upload route, the API and the CLI call model.images.intake, never a decoder."""
    wrong = []
    for name, path in _modules().items():
        if name.split(".")[0] in ("app", "cli", "tools") and name != "tools.fixtures":
            tree = ast.parse(path.read_text())
            for node, called in _calls(tree):
                opened = called == "open" and isinstance(node.func, ast.Attribute) and \
                    isinstance(node.func.value, ast.Name) and node.func.value.id == "Image"
                if called in DECODERS or opened:
                    wrong.append(f"{name}:{node.lineno} {called}")
    assert not wrong, wrong


def test_engines_generations_and_runners_are_never_probed():
    """No hasattr/getattr on an engine, an answer or a runner in the app or in serving: their
    contracts (AnswerEngine, Answer, ModelRunner) say what each has."""
    wrong = []
    for name, path in _modules().items():
        if name.startswith(("app", "model.serving")):
            for node, called in _calls(ast.parse(path.read_text())):
                if called in ("hasattr", "getattr") and node.args:
                    target = ast.unparse(node.args[0])
                    if any(word in target for word in ("engine", "generation", "runner", "request")):
                        wrong.append(f"{name}:{node.lineno} {called}({target}, ...)")
    assert not wrong, wrong


def test_the_quantisation_modes_are_listed_in_one_file():
    """A literal list of the modes (a tuple, list, set or Literal[...] naming both nf4 and int8w, or
    both q4_k_m and q8_0) is written in model/choices.py alone (tables of figures per mode are data)."""
    holders = set()
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            elements = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else []
            words = {e.value for e in elements if isinstance(e, ast.Constant) and isinstance(e.value, str)}
            if {"nf4", "int8w"} <= words or {"q4_k_m", "q8_0"} <= words:
                holders.add(name)
    assert holders == {"model.choices"}, holders
