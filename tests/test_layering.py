"""The layers import one way: utils/ (foundations) <- models/ <- engines/ <- the scripts.
models/ never reads the task table (utils/tasks.py): tasks reach the model as TaskSpecs."""
import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"train", "evaluate", "evaluate_vlm", "train_vlm", "sentence_distiller", "combine_all", "pretrain"}


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


def violations(package, forbidden):
    found = []
    for path in package_files(package):
        for module in imported_modules(os.path.join(REPO, path)):
            top = module.split(".")[0]
            if top in forbidden or any(module == f or module.startswith(f + ".") for f in forbidden):
                found.append(f"{path} imports {module}")
    return found


@pytest.mark.parametrize("package, forbidden", [
    ("utils", {"models", "engines", *SCRIPTS}),
    ("models", {"engines", "utils.tasks", *SCRIPTS}),
    ("engines", SCRIPTS),
])
def test_layers_import_one_way(package, forbidden):
    assert list(package_files(package)), package  # the package is there to be checked
    assert violations(package, forbidden) == []


def test_the_check_sees_a_forbidden_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from engines.training import run_training\n", encoding="utf-8")
    assert "engines.training" in imported_modules(str(bad))
