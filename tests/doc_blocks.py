"""The runnable blocks of the documentation, README.md and the site's pages (docs/**/*.md), and the one way to
run them (tests/test_readme.py, tests/test_docs.py, tests/lmms_eval/test_docs_eval.py).

A ```` ```python ```` block runs as written, in a fresh interpreter, in a scratch directory. A ```` ```bash ````
block that starts with `# (tested)` runs in bash (`-euo pipefail`); the site's tested shell blocks run one after
another, in reading order (mkdocs.yml's nav), in one scratch directory: a later page's block uses what an earlier
page's block wrote (`run/stage3` from the pre-training guide). `# (tested: eval)` blocks run in the lmms-eval world.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
TESTED = "# (tested)"
TESTED_IN_EVAL = "# (tested: eval)"


def _nav_paths(item) -> list[str]:
    if isinstance(item, str):
        return [item]
    if isinstance(item, list):
        return [path for entry in item for path in _nav_paths(entry)]
    if isinstance(item, dict):
        return [path for value in item.values() for path in _nav_paths(value)]
    return []


def site_pages() -> list[Path]:
    """The site's markdown pages under docs/, in the order the site lists them, then any page it does not list."""
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    listed = [DOCS / path for path in _nav_paths(nav) if (DOCS / path).is_file()]
    return listed + sorted(set(DOCS.rglob("*.md")) - set(listed))


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.S | re.M)


def shell_blocks(path: Path, tag: str = TESTED) -> list[str]:
    """The ```` ```bash ```` blocks of `path` whose first line is `tag` (`# (tested)` or `# (tested: eval)`)."""
    blocks = re.findall(r"^```bash\n(.*?)^```", path.read_text(), flags=re.S | re.M)
    return [block for block in blocks if block.split("\n", 1)[0].startswith(tag)]


def block_id(path: Path, index: int) -> str:
    return f"{path.relative_to(ROOT).as_posix()}:{index}"


def shell_environment() -> dict[str, str]:
    """The test's interpreter first on PATH (its console scripts: hive-train, ...), no hub."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}


def run_python_block(block: str, directory: Path, timeout: int = 300) -> None:
    """Run one python block as written, in a fresh interpreter, in `directory`; fail with its stderr."""
    script = directory / "block.py"
    script.write_text(block)
    result = subprocess.run(
        [sys.executable, str(script)], cwd=directory, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stderr[-3000:]


def run_shell_blocks(blocks: list[str], directory: Path, timeout: int = 900) -> list[str]:
    """Run shell blocks one after another in `directory`; fail at the first that fails, with its output. Returns
    each block's standard output."""
    outputs = []
    for block in blocks:
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", block],
            cwd=directory,
            capture_output=True,
            text=True,
            env=shell_environment(),
            timeout=timeout,
        )
        assert result.returncode == 0, block + result.stdout[-2000:] + result.stderr[-4000:]
        outputs.append(result.stdout)
    return outputs
