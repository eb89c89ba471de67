"""The module paths of hive-adapter 0.3 and earlier, kept working until 0.4 (issue 26 item 1).

Until 0.3 every module sat flat in `hive_adapter/`; they now live in role packages (docs/ARCHITECTURE.md §2). An
import of an old path warns once (DeprecationWarning) and gives the *same module object* as the new path, so classes,
`isinstance`, pickles naming the old path and `mock.patch("hive_adapter.train.X")` keep working; `python -m
hive_adapter.train ...` (scripts, torchrun, deepspeed) runs the new module as `__main__`. One import-system finder
does it (`install`, called by `hive_adapter/__init__.py`), instead of one shim file per old module.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import CodeType, ModuleType

REMOVED_IN = "0.4"

_MODEL = (
    "config", "levels", "cross_attention", "layout", "context", "vision", "runtime", "attach", "splice", "mixin",
    "modeling_hive", "adapter_model", "connectors", "builders", "architectures", "parameters", "packing",
    "processing_hive", "loading",
)  # fmt: skip

# old module path -> new one
MOVED: dict[str, str] = {
    **{f"hive_adapter.{name}": f"hive_adapter.model.{name}" for name in _MODEL},
    **{f"hive_adapter.{name}": f"hive_adapter.utils.{name}" for name in ("outputs", "console", "distributed")},
    "hive_adapter.train": "hive_adapter.training.train",
    "hive_adapter.train_arguments": "hive_adapter.training.cli_arguments",
    "hive_adapter.arguments": "hive_adapter.training.hive_flags",
    "hive_adapter.stages": "hive_adapter.training.stages",
    "hive_adapter.stage_plan": "hive_adapter.training.plan",
    "hive_adapter.trainer": "hive_adapter.training.trainer",
    "hive_adapter.checkpoints": "hive_adapter.training.checkpoints",
    "hive_adapter.resume": "hive_adapter.training.resume",
    "hive_adapter.toy": "hive_adapter.tools.toy_models",
    "hive_adapter.toy_pretraining": "hive_adapter.tools.toy_pretraining",
    "hive_adapter.export": "hive_adapter.tools.export",
    "hive_adapter.real_lm": "hive_adapter.tools.real_lm",
    "hive_adapter.serve": "hive_adapter.tools.serve",
}


def moved_message(old: str) -> str:
    return f"{old} moved to {MOVED[old]}; the old path works until {REMOVED_IN}"


# `python -m <old path>`: runpy runs the code object below in `__main__`, with `__spec__` / `__package__` of the old
# name, from which the new module's relative imports would not resolve; so the code sets the new module's and runs
# its code, exactly as `python -m <new path>` does. The warning is attributed to `__main__`, so it shows by default.
_RUN_AS_MAIN = """\
import importlib.util as _util
import sys as _sys
import warnings as _warnings

_warnings.warn({message!r}, DeprecationWarning, stacklevel=1)
_spec = _util.find_spec({new!r})
_sys.argv[0] = _spec.origin
globals().update(
    __spec__=_spec, __package__=_spec.parent, __loader__=_spec.loader, __file__=_spec.origin, __cached__=_spec.cached
)
del _util, _sys, _warnings
exec(_spec.loader.get_code({new!r}), globals())
"""


class _MovedModuleLoader(importlib.abc.Loader):
    """Loads an old path as the new module: `sys.modules[old] is sys.modules[new]`."""

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None  # a placeholder the import system fills in; `exec_module` replaces it with the new module

    def exec_module(self, module: ModuleType) -> None:
        old = module.__name__
        # stacklevel 2: the frame that imported the old path (the import system's own frames are skipped)
        warnings.warn(moved_message(old), DeprecationWarning, stacklevel=2)
        # The import system returns what sys.modules holds under the name once this returns (the "module replaced
        # itself in sys.modules" case), so the placeholder is dropped and the old name *is* the new module.
        sys.modules[old] = importlib.import_module(MOVED[old])

    def is_package(self, fullname: str) -> bool:
        return False

    def get_code(self, fullname: str) -> CodeType:
        """For runpy (`python -m <old path>`)."""
        source = _RUN_AS_MAIN.format(message=moved_message(fullname), new=MOVED[fullname])
        return compile(source, f"<{fullname}: moved to {MOVED[fullname]}>", "exec")

    def get_source(self, fullname: str) -> None:
        return None


class _MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Finds the old paths of `MOVED`, and nothing else. It comes first in `sys.meta_path`: a file left at an old path
    (a stale copy, an editable install of an older checkout, whose finder serves the package's children) must not
    load a second copy of a module, with classes of its own."""

    loader = _MovedModuleLoader()

    def find_spec(self, fullname: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self.loader, is_package=False)


def install() -> None:
    """Add the finder to `sys.meta_path` (once, however often the package is imported)."""
    if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _MovedModuleFinder())


def moved_attribute(name: str) -> ModuleType:
    """`hive_adapter.<old module>` as an attribute (`hive_adapter.config.HiveConfig` after `import hive_adapter`,
    `from hive_adapter import train`): the package's `__getattr__` asks here. Warns once, like an import."""
    old = f"hive_adapter.{name}"
    if old not in MOVED:
        raise AttributeError(f"module 'hive_adapter' has no attribute {name!r}")
    if old not in sys.modules:
        # stacklevel 3: past this function and the package's __getattr__, to the line that named the old module
        warnings.warn(moved_message(old), DeprecationWarning, stacklevel=3)
        sys.modules[old] = importlib.import_module(MOVED[old])
    return sys.modules[old]
