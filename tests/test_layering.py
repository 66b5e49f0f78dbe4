"""The layers import one way, with no circle (ARCHITECTURE.md):

    utils/ (foundations)  <-  models/  <-  tasks/  <-  engines/  <-  scripts (and bench/)

A module imports only from its own layer or the layers before it, imports at any depth count
(those inside functions too), no two modules import each other through any chain, and a script
never imports another script. models/ never reads the task package: tasks reach the model as
TaskSpecs."""
import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"train", "evaluate", "evaluate_vlm", "train_vlm", "sentence_distiller", "combine_all", "pretrain",
           "serve", "score", "peft_io", "federated"}
LAYERS = ["utils", "models", "tasks", "engines"]  # in order; scripts and bench/ come after them all


def imported_modules(path):
    """Every module a file imports, at any depth (imports inside functions count too)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def package_files(package):
    folder = os.path.join(REPO, package)
    for root, _, files in os.walk(folder):
        for name in sorted(files):
            if name.endswith(".py"):
                yield os.path.relpath(os.path.join(root, name), REPO)


def script_files():
    return sorted(name for name in os.listdir(REPO) if name.endswith(".py") and name[:-3] in SCRIPTS)


def module_name(path):
    """tasks/base.py -> tasks.base; models/methods/__init__.py -> models.methods; train.py -> train."""
    parts = path[:-3].split(os.sep)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def repo_modules():
    """{module name: file path} of every module of the layers and every script."""
    files = [path for layer in LAYERS for path in package_files(layer)] + script_files()
    return {module_name(path): path for path in files}


def layer_of(module):
    """0.. for the layers, len(LAYERS) for scripts and bench/, None for anything outside the repo."""
    top = module.split(".")[0]
    if top in LAYERS:
        return LAYERS.index(top)
    if top in SCRIPTS or top == "bench":
        return len(LAYERS)
    return None


def violations(path):
    """Imports of `path` that reach a later layer, or another script from a script."""
    found = []
    own = module_name(path)
    for module in sorted(imported_modules(os.path.join(REPO, path))):
        layer = layer_of(module)
        if layer is None or any(module.startswith(seen.split()[-1] + ".") for seen in found):
            continue  # outside the repo, or a name of a module already reported
        top = module.split(".")[0]
        if own in SCRIPTS and top in SCRIPTS:
            found.append(f"{path} imports the script {top}")
        elif layer > layer_of(own):
            found.append(f"{path} imports {module}")
    return found


def import_graph(modules):
    """{module: modules of the repo it imports}; `from a.b import c` reaches a.b.c when that is a module."""
    graph = {}
    for name, path in modules.items():
        targets = set()
        for module in imported_modules(os.path.join(REPO, path)):
            if module in modules:
                targets.add(module)
            elif module.rpartition(".")[0] in modules and module not in modules:
                targets.add(module.rpartition(".")[0])
        targets.discard(name)
        graph[name] = targets
    return graph


def cycles(graph):
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


@pytest.mark.parametrize("package", LAYERS + ["scripts"])
def test_layers_import_one_way(package):
    paths = script_files() if package == "scripts" else list(package_files(package))
    assert paths, package  # the package is there to be checked
    assert [v for path in paths for v in violations(path)] == []


def test_no_import_circle():
    modules = repo_modules()
    assert "tasks.base" in modules and "engines.training" in modules and "train" in modules
    assert cycles(import_graph(modules)) == []


def test_the_checks_see_a_forbidden_import_and_a_circle(tmp_path, monkeypatch):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from engines.training import run_training\n", encoding="utf-8")
    assert "engines.training" in imported_modules(str(bad))
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    # a layer that reaches up, and a script importing a script, are both found
    (tmp_path / "utils").mkdir()
    (tmp_path / "utils" / "x.py").write_text("from tasks.table import TASKS\n", encoding="utf-8")
    (tmp_path / "train.py").write_text("import evaluate\n", encoding="utf-8")
    monkeypatch.setattr(__import__(__name__), "REPO", str(tmp_path))
    assert violations(os.path.join("utils", "x.py")) == ["utils/x.py imports tasks.table"]
    assert violations("train.py") == ["train.py imports the script evaluate"]
