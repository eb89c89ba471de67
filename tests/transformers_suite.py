"""transformers' own common model tests (`ModelTesterMixin`, `ConfigTester`), from its source distribution.

Every model in transformers is judged by `tests/test_modeling_common.py` and
`tests/test_configuration_common.py`. They ship in the source distribution of the installed
transformers version on the package registry (not in the wheel), so this module downloads that sdist
once with pip, extracts the two files into a cache (`.cache/transformers-tests/<version>/`, never
into the repository) and makes them importable as the package `transformers_tests`.

The sdist does not hold three helper modules the two files import; small stand-ins are written next
to them, and the tests that would need the real ones are skipped by name in
tests/test_transformers_common.py:
- `exporters/test_export.py` (`ExportTesterMixin`: torch.export tests) -> an empty mixin;
- `generation/test_utils.py` (`GenerationTesterMixin`) -> an empty mixin; generation is covered by
  tests/test_generation_matrix.py instead;
- `utils/test_configuration_utils.py` (`config_common_kwargs`) -> empty: `ConfigTester` only uses it
  for configs without sub-configs, and `HiveConfig` has two.

    python tests/transformers_suite.py      # fetch now (make setup does); prints the cache path
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import transformers
from filelock import FileLock

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "transformers-tests"
PACKAGE = "transformers_tests"
FILES = ("test_modeling_common.py", "test_configuration_common.py")

STAND_INS = {
    "__init__.py": '"""transformers\' common tests, extracted from its sdist by tests/transformers_suite.py."""\n',
    "exporters/__init__.py": "",
    "exporters/test_export.py": (
        '"""Stand-in: tests/exporters/test_export.py is not in transformers\' sdist."""\n\n\n'
        "class ExportTesterMixin:\n"
        '    """torch.export tests live in the repository only; none run here."""\n'
    ),
    "generation/__init__.py": "",
    "generation/test_utils.py": (
        '"""Stand-in: tests/generation/test_utils.py is not in transformers\' sdist."""\n\n\n'
        "class GenerationTesterMixin:\n"
        '    """generate() is tested by hive-adapter\'s tests/test_generation_matrix.py instead."""\n'
    ),
    "utils/__init__.py": "",
    "utils/test_configuration_utils.py": (
        '"""Stand-in: tests/utils/test_configuration_utils.py is not in transformers\' sdist."""\n\n'
        "# ConfigTester reads this only for configs without sub-configs; HiveConfig has two.\n"
        "config_common_kwargs = {}\n"
    ),
}


def version() -> str:
    return transformers.__version__


def suite_root(transformers_version: str | None = None) -> Path:
    """The directory to put on `sys.path` so that `import transformers_tests` finds the extracted suite."""
    return CACHE / (transformers_version or version())


def ensure_transformers_tests(transformers_version: str | None = None) -> Path:
    """Download (once) and extract transformers' common tests; return the directory holding the package."""
    transformers_version = transformers_version or version()
    root = suite_root(transformers_version)
    package = root / PACKAGE
    if all((package / name).is_file() for name in (*FILES, *STAND_INS)):
        return root
    # pytest's xdist workers each import tests/test_transformers_common.py, so each may come here at once: one
    # downloads and extracts, the others wait, then find it complete (a second one would replace the tree the
    # first is importing from)
    with FileLock(str(_made(CACHE) / f".{transformers_version}.lock")):
        if not all((package / name).is_file() for name in (*FILES, *STAND_INS)):
            _download_and_extract(transformers_version, root)
    return root


def _download_and_extract(transformers_version: str, root: Path) -> None:
    with tempfile.TemporaryDirectory() as download:
        command = [
            sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps",
            f"transformers=={transformers_version}", "--dest", download,
        ]  # fmt: skip
        completed = subprocess.run(command, capture_output=True, text=True)
        archives = list(Path(download).glob("transformers-*.tar.gz"))
        if completed.returncode != 0 or not archives:
            raise RuntimeError(
                f"could not download the source distribution of transformers=={transformers_version} from the package "
                f"registry (needed for its common model tests): {completed.stderr.strip()[-2000:]}"
            )
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=_made(CACHE)))
        with tarfile.open(archives[0]) as archive:
            for name in FILES:
                member = archive.getmember(f"transformers-{transformers_version}/tests/{name}")
                data = archive.extractfile(member).read()
                _made(staging / PACKAGE).joinpath(name).write_bytes(data)
        for name, text in STAND_INS.items():
            target = staging / PACKAGE / name
            _made(target.parent)
            target.write_text(text)
        if root.exists():  # an incomplete earlier extraction of ours: replace it whole
            shutil.rmtree(root)
        staging.rename(root)


def _made(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return directory


if __name__ == "__main__":
    print(ensure_transformers_tests())
