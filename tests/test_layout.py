"""The package by role (issue 26 item 1): `model/` (the core), `utils/`, `training/`, `tools/`.

The modules that sat flat in `hive_adapter/` until 0.3 still import under their old paths, with a
DeprecationWarning, until 0.4: the old path *is* the new module (`sys.modules[old] is sys.modules[new]`), so
classes, `isinstance` and monkeypatching are unchanged; `python -m <old path>` runs the new module.
"""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import hive_adapter

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "hive_adapter"

# The flat modules of 0.3 by the package of their role now (docs/ARCHITECTURE.md §2); four were renamed.
FLAT_IN_0_3 = {
    "model": "config levels cross_attention layout context vision runtime attach splice mixin modeling_hive "
    "adapter_model connectors builders architectures parameters packing processing_hive loading",
    "utils": "outputs console distributed",
    "training": "train train_arguments arguments stages stage_plan trainer checkpoints resume",
    "tools": "toy toy_pretraining export real_lm serve",
}
RENAMED = {"train_arguments": "cli_arguments", "arguments": "hive_flags", "stage_plan": "plan", "toy": "toy_models"}
MOVED = {
    f"hive_adapter.{old}": f"hive_adapter.{package}.{RENAMED.get(old, old)}"
    for package, modules in FLAT_IN_0_3.items()
    for old in modules.split()
}

# what `hive_adapter/__init__.py` exported before the move, unchanged
PUBLIC_API = {
    "__version__", "HiveConfig", "HiveCrossAttention", "HiveCrossAttentionBlock", "HiveForConditionalGeneration",
    "HiveLevelEncoder", "HiveModel", "HivePreTrainedModel", "HiveProcessor", "HiveProjector", "HiveRuntime",
    "HiveVisionContext", "get_hive_model", "image_token_id_from_tokenizer", "is_hive_parameter", "mark_hive_trainable",
}  # fmt: skip

# The core (model/) and the infrastructure it may use (utils/): what each may import from hive_adapter.
MAY_IMPORT = {
    "model": ("hive_adapter.model", "hive_adapter.utils", "hive_adapter.version"),
    "utils": ("hive_adapter.utils", "hive_adapter.version"),
}


def python(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=300, **kwargs)


def test_every_module_sits_in_its_role_package():
    flat = sorted(path.stem for path in PACKAGE.glob("*.py"))
    assert flat == ["__init__", "_moved", "version"], "a module in hive_adapter/ itself: put it in a role package"
    for old, new in MOVED.items():
        assert (ROOT / (new.replace(".", "/") + ".py")).is_file(), new
        assert not (ROOT / (old.replace(".", "/") + ".py")).exists(), old


def test_the_table_of_moved_modules_is_the_packages():
    from hive_adapter._moved import MOVED as table

    assert len(MOVED) == 35
    assert table == MOVED


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_path_is_the_new_module_and_warns_once(old):
    new = MOVED[old]
    module = importlib.import_module(new)
    sys.modules.pop(old, None)  # an alias only: the new module stays
    vars(hive_adapter).pop(old.rpartition(".")[2], None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert importlib.import_module(old) is module
        assert sys.modules[old] is sys.modules[new] is module
        importlib.import_module(old)  # cached: no second warning
        assert getattr(hive_adapter, old.rpartition(".")[2]) is module
    messages = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    assert messages == [f"{old} moved to {new}; the old path works until 0.4"]


@pytest.mark.parametrize("old", ["hive_adapter.train", "hive_adapter.config"])
def test_an_old_module_as_an_attribute_of_the_package_is_the_new_module(old):
    short, new = old.rpartition(".")[2], importlib.import_module(MOVED[old])
    sys.modules.pop(old, None)
    vars(hive_adapter).pop(short, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(f"from hive_adapter import {short} as first", namespace := {})
        assert namespace["first"] is new
        assert getattr(hive_adapter, short) is new and sys.modules[old] is new
        importlib.import_module(old)
    assert [(str(w.message), w.filename) for w in caught] == [
        (f"{old} moved to {MOVED[old]}; the old path works until 0.4", "<string>")
    ]


def test_names_from_an_old_path_are_the_same_objects():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from hive_adapter.config import HiveConfig
        from hive_adapter.modeling_hive import HiveForConditionalGeneration
        from hive_adapter.train import cli

    assert HiveConfig is hive_adapter.HiveConfig
    assert HiveForConditionalGeneration is hive_adapter.HiveForConditionalGeneration
    assert cli is importlib.import_module("hive_adapter.training.train").cli


def test_an_old_import_warns_where_the_user_wrote_it():
    # default filters: a DeprecationWarning shows when it is attributed to __main__, i.e. to the importing line
    result = python(
        "-c", "import hive_adapter.config\nimport hive_adapter.config\nfrom hive_adapter.toy import ToySizes"
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("hive_adapter.config moved to hive_adapter.model.config") == 1, result.stderr
    assert "hive_adapter.toy moved to hive_adapter.tools.toy_models; the old path works until 0.4" in result.stderr


def test_an_unknown_module_is_still_an_import_error():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("hive_adapter.no_such_module")
    with pytest.raises(AttributeError):
        hive_adapter.no_such_module  # noqa: B018


@pytest.mark.parametrize("old", ["hive_adapter.train", "hive_adapter.toy"])
def test_python_dash_m_with_an_old_path_runs_the_new_module(old):
    result = python("-m", old, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:"), result.stdout
    assert f"{old} moved to {MOVED[old]}; the old path works until 0.4" in result.stderr


def test_the_public_api_is_unchanged():
    assert set(hive_adapter.__all__) == PUBLIC_API
    for name in PUBLIC_API:
        assert getattr(hive_adapter, name) is not None


def documented_imports() -> list[str]:
    """Every import of hive_adapter in the documentation's code blocks (the README and the site's pages), one
    statement each."""
    from doc_blocks import README, python_blocks, site_pages

    documents = [README, *site_pages()]
    text = "\n".join(path.read_text() for path in documents)
    statements = []
    for block in (block for path in documents for block in python_blocks(path)):
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hive_adapter"):
                statements.append(f"from {node.module} import {', '.join(alias.name for alias in node.names)}")
            elif isinstance(node, ast.Import):
                statements += [f"import {a.name}" for a in node.names if a.name.startswith("hive_adapter")]
    statements += [f"import {module}" for module in sorted(set(re.findall(r"-m (hive_adapter(?:\.\w+)+)", text)))]
    used = sorted(set(re.findall(r"\bhive\.([A-Za-z_]\w*)", text)))
    return [*statements, "import hive_adapter as hive", *(f"hive.{name}" for name in used)]


def test_every_name_the_documentation_imports_still_imports_without_warnings():
    check = documented_imports()
    assert len(check) >= 10, check  # the python blocks' imports, the `python -m` commands, the hive.* names
    result = python("-W", "error::DeprecationWarning", "-c", "\n".join(check))
    assert result.returncode == 0, result.stderr


def imports_of(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """Every module `path` imports from hive_adapter (anywhere: functions and TYPE_CHECKING blocks too),
    relative imports resolved."""
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            # `from hive_adapter.model import config` imports the module hive_adapter.model.config
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return [(line, name) for line, name in found if name == "hive_adapter" or name.startswith("hive_adapter.")]


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_the_core_imports_nothing_from_the_periphery(package):
    allowed = MAY_IMPORT[package]
    files = sorted((PACKAGE / package).glob("*.py"))
    assert files
    wrong = [
        f"{path.relative_to(ROOT)}:{line}: {name}"
        for path in files
        for line, name in imports_of(path)
        if not name.startswith(tuple(f"{prefix}." for prefix in allowed)) and name not in allowed
    ]
    assert not wrong, f"hive_adapter/{package}/ may import only {allowed}:\n" + "\n".join(wrong)


def test_the_import_check_sees_relative_and_late_imports(tmp_path):
    # the check above would pass vacuously if it missed these forms
    core = tmp_path / "hive_adapter" / "model"
    core.mkdir(parents=True)
    (core / "x.py").write_text(
        "from ..training import plan\nfrom .config import A\ndef f():\n    from ..data.collator import B\n"
    )
    names = [name for _, name in imports_of(core / "x.py", root=tmp_path)]
    assert names == ["hive_adapter.training.plan", "hive_adapter.model.config.A", "hive_adapter.data.collator.B"]


def test_saved_artifacts_name_no_module_path(tmp_path):
    """Checkpoints, processors and adapters written by 0.3 and by this layout are the same: nothing saved names a
    module of hive_adapter (transformers' Auto classes find model_type "hive" through the registration)."""
    from hive_checkpoints import save_hive_checkpoint, save_llava_hf_with_adapter, toy_models
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    models = toy_models(tmp_path / "toy")
    directory = save_hive_checkpoint(models, tmp_path / "model")
    config = hive_adapter.HiveConfig.from_pretrained(directory)
    hive_adapter.HiveProcessor.for_model(
        config,
        tokenizer=AutoTokenizer.from_pretrained(models[1]),
        image_processor=AutoImageProcessor.from_pretrained(models[0]),
    ).save_pretrained(directory)
    save_llava_hf_with_adapter(tmp_path / "llava")

    assert type(AutoConfig.from_pretrained(directory)) is hive_adapter.HiveConfig
    assert type(AutoModelForImageTextToText.from_pretrained(directory)) is hive_adapter.HiveForConditionalGeneration
    assert type(AutoProcessor.from_pretrained(directory)) is hive_adapter.HiveProcessor
    naming = [
        str(path.relative_to(tmp_path))
        for path in sorted((tmp_path / "model").rglob("*")) + sorted((tmp_path / "llava" / "adapter").rglob("*"))
        if path.is_file() and b"hive_adapter" in path.read_bytes()
    ]
    assert not naming


def test_setup_py_entry_points_name_the_new_paths():
    setup = (ROOT / "setup.py").read_text()
    entries = re.findall(r'"([\w-]+)\s*=\s*(hive_adapter[\w.]*):(\w+)"', setup)
    assert {name for name, _, _ in entries} >= {"hive-train", "hive-export-vision", "hive-serve", "hive"}
    for name, module, attribute in entries:
        assert module not in MOVED, f"{name} names the old path {module}"
        assert callable(getattr(importlib.import_module(module), attribute)), name


def module_of(name: str, root: Path = ROOT) -> str | None:
    """The module file an imported name lives in: `hive_adapter.model.config.HiveConfig` -> `...model.config`."""
    parts = name.split(".")
    while parts:
        path = root.joinpath(*parts)
        if path.with_suffix(".py").is_file() or (path / "__init__.py").is_file():
            return ".".join(parts)
        parts.pop()
    return None


def import_graph(packages: tuple[str, ...] = ("hive_adapter", "benchmarks"), root: Path = ROOT) -> dict[str, set]:
    """File -> the files it imports (anywhere in it, TYPE_CHECKING blocks too), within `packages`."""
    graph = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
            package_of = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
            targets = set()
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    base = node.module or ""
                    if node.level:
                        parts = package_of.split(".")
                        base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                    names = [f"{base}.{alias.name}" for alias in node.names]
                for name in names:
                    if name.split(".")[0] in packages and (target := module_of(name, root)) not in (None, module):
                        targets.add(target)
            graph[module] = targets
    return graph


def import_circles(graph: dict[str, set]) -> list[list[str]]:
    """The strongly connected groups of more than one file (Tarjan): each is an import circle."""
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                circles.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return circles


def test_no_import_circle_between_files():
    """Issue 40: a file imports another only if that one does not import it back, however indirectly (package
    __init__ files included: `import hive_adapter` is an import of hive_adapter/__init__.py)."""
    circles = import_circles(import_graph())
    assert not circles, "import circles:\n" + "\n".join(" <-> ".join(circle) for circle in circles)


def test_the_circle_check_sees_a_circle_through_a_late_import(tmp_path):
    package = tmp_path / "hive_adapter"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .b import B\n")
    (package / "b.py").write_text("def f():\n    from hive_adapter.c import C\n")
    (package / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import A\n")
    assert import_circles(import_graph(("hive_adapter",), tmp_path)) == [
        ["hive_adapter.a", "hive_adapter.b", "hive_adapter.c"]
    ]


def test_no_file_over_400_lines():
    """Issue 40: files are split by role (what runs, what it measures, what it writes) before they grow past 400
    lines (CONTRIBUTING.md)."""
    long = {
        str(path.relative_to(ROOT)): count
        for package in ("hive_adapter", "benchmarks")
        for path in sorted((ROOT / package).rglob("*.py"))
        if (count := len(path.read_text().splitlines())) > 400
    }
    assert not long, long
