"""The tree's layers import one way: engine <- serving <- orchestration; kv_transfer stands alone;
nothing the server loads imports the client; the light processes never load torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT

PACKAGE = "python_backend_utils"
# Modules at the package's top level that every layer may use: no torch, no Triton, no engine.
SHARED = {f"{PACKAGE}.errors", f"{PACKAGE}.environment", f"{PACKAGE}.prefix_hashing", f"{PACKAGE}.context_window",
          f"{PACKAGE}.cpu_features"}
MAX_MODULE_LINES = 420


def modules(root: str) -> list[Path]:
    return sorted((REPO_ROOT / root).rglob("*.py"))


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def violations(root: str, forbidden: tuple[str, ...]) -> list[str]:
    return [f"{path.relative_to(REPO_ROOT)} imports {name}"
            for path in modules(root) for name in sorted(imported(path))
            if any(name == f or name.startswith(f + ".") for f in forbidden)]


def test_engine_imports_nothing_of_triton_transfer_or_the_layers_above():
    assert violations(f"{PACKAGE}/engine", (
        f"{PACKAGE}.serving", f"{PACKAGE}.orchestration", "kv_transfer", "triton_python_backend_utils",
        "tritonclient", "client", "launcher")) == []


def test_serving_never_imports_orchestration():
    assert violations(f"{PACKAGE}/serving", (f"{PACKAGE}.orchestration", "client", "launcher")) == []


def test_the_shared_triton_glue_belongs_to_neither_side():
    """Both the worker models (serving) and the orchestrator use it: it imports neither, nor the engine's
    torch side (only the torch-free sampling settings)."""
    found = violations(f"{PACKAGE}/triton_glue", (f"{PACKAGE}.serving", f"{PACKAGE}.orchestration", f"{PACKAGE}.engine",
                                                    "torch", "kv_transfer", "client", "launcher"))
    assert [v for v in found if not v.endswith(f" imports {PACKAGE}.engine.sampling_params")] == []


def test_orchestration_never_imports_the_engine_or_torch():
    assert violations(f"{PACKAGE}/orchestration", (
        f"{PACKAGE}.engine", "torch", "kv_transfer", "transformers", "client", "launcher")) == []


def test_shared_modules_import_only_the_standard_library():
    for name in SHARED:
        path = REPO_ROOT / (name.replace(".", "/") + ".py")
        assert {n.split(".")[0] for n in imported(path)} <= set(sys.stdlib_module_names) | {"__future__"}, path


def test_openai_frontend_is_a_client_of_triton_without_the_engine():
    assert violations("openai_frontend", (
        f"{PACKAGE}.engine", f"{PACKAGE}.orchestration", "torch", "transformers", "kv_transfer",
        "triton_python_backend_utils", "client", "launcher")) == []


def test_openai_frontend_loads_neither_torch_nor_transformers():
    probe = "import sys, openai_frontend.__main__; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO_ROOT, check=True)
    assert result.stdout.strip() == "[]"


def test_kv_transfer_stands_alone():
    assert violations("kv_transfer", (PACKAGE, "client", "launcher", "benchmarks", "triton_python_backend_utils",
                                      "tritonclient")) == []


def test_no_module_the_server_loads_is_oversized():
    oversized = [f"{path.relative_to(REPO_ROOT)}: {n} lines"
                 for root in (PACKAGE, "kv_transfer", "openai_frontend") for path in modules(root)
                 if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES]
    assert oversized == []


LIGHT_MODELS = ["preprocessing", "postprocessing", "disaggregated_serving_bls"]
# Importing a model.py with a stand-in for the module only the Python-backend stub provides.
IMPORT_MODEL = """
import importlib.util, sys, types
sys.modules["triton_python_backend_utils"] = types.SimpleNamespace(
    TRITONSERVER_RESPONSE_COMPLETE_FINAL=1, TritonError=object, InferenceResponse=object, Tensor=object)
spec = importlib.util.spec_from_file_location("model", sys.argv[1])
spec.loader.exec_module(importlib.util.module_from_spec(spec))
print(sorted(m for m in ("torch", "transformers", "kv_transfer") if m in sys.modules))
"""


@pytest.mark.parametrize("model", LIGHT_MODELS)
def test_light_models_load_neither_torch_nor_the_engine(model):
    path = REPO_ROOT / "model_repository" / model / "1" / "model.py"
    result = subprocess.run([sys.executable, "-c", IMPORT_MODEL, str(path)], capture_output=True, text=True,
                            cwd=REPO_ROOT, check=True)
    assert result.stdout.strip() == "[]"


# The deployment file's format (standard library and yaml): the planner reads and writes that file.
DEPLOYMENT_FORMAT = f"{PACKAGE}.orchestration.deployment"


def test_planner_models_the_server_without_loading_it():
    found = violations("planner", (PACKAGE, "torch", "triton_python_backend_utils", "tritonclient", "kv_transfer",
                                   "launcher", "transformers"))
    assert [v for v in found if not v.endswith(f" imports {DEPLOYMENT_FORMAT}")] == []
    format_path = REPO_ROOT / (DEPLOYMENT_FORMAT.replace(".", "/") + ".py")
    assert {n.split(".")[0] for n in imported(format_path)} <= set(sys.stdlib_module_names) | {"__future__", "yaml"}
    assert [path.name for path in modules("planner") if len(path.read_text().splitlines()) > 400] == []


FIRST_PARTY = ("python_backend_utils", "kv_transfer", "client", "launcher", "openai_frontend", "planner",
               "benchmarks")


def first_party_imports() -> dict[str, set[str]]:
    """Each first-party module's imports of first-party modules (`from package import module` included)."""
    paths = {".".join(path.relative_to(REPO_ROOT).with_suffix("").parts).removesuffix(".__init__"): path
             for root in FIRST_PARTY for path in modules(root)}
    graph = {}
    for name, path in paths.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.update([node.module, *(f"{node.module}.{alias.name}" for alias in node.names)])
        graph[name] = {n for n in found if n in paths and n != name}
    return graph


def test_no_module_imports_itself_back():
    """A cycle (plan <-> live, study <-> study_report once) means two modules that are one, or a dispatch in
    the wrong place."""
    graph = first_party_imports()

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            name = todo.pop()
            if name == goal:
                return True
            if name not in seen:
                seen.add(name)
                todo.extend(graph[name])
        return False

    assert sorted(f"{a} <-> {b}" for a in graph for b in graph[a] if a < b and reaches(b, a)) == []
