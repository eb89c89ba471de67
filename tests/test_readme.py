"""Every Python block of the README runs as written (in a fresh interpreter, in a scratch directory)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index, tmp_path):
    script = tmp_path / f"block_{index}.py"
    script.write_text(BLOCKS[index])
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_readme_commands_name_real_make_targets():
    makefile = (README.parent / "Makefile").read_text()
    for target in re.findall(r"^make (\w+)", README.read_text(), flags=re.M):
        assert re.search(rf"^{target}:", makefile, flags=re.M), target


SHELL_BLOCKS = [
    b for b in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S) if b.startswith("# (tested)")
]


def test_readme_shell_blocks_run_in_order(tmp_path):
    """The `# (tested)` shell blocks run as written, one after another, in a scratch directory."""
    import os

    assert len(SHELL_BLOCKS) >= 2
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}
    for block in SHELL_BLOCKS:
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", block],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env=env,
            timeout=900,
        )
        assert result.returncode == 0, block + result.stdout[-2000:] + result.stderr[-4000:]
    assert (tmp_path / "run" / "stage3" / "model.safetensors").is_file()
    assert (tmp_path / "vision_encoder" / "config.json").is_file()
    gradients = json.loads((tmp_path / "analysis" / "gradients.json").read_text())
    assert len(gradients["layers"]) == 8 and (tmp_path / "analysis" / "attention.png").is_file()
    assert json.loads((tmp_path / "analysis" / "probe.json").read_text())["classes"] == [
        "circle",
        "cross",
        "square",
        "triangle",
    ]
    assert (tmp_path / "run_zero3" / "stage1" / "model.safetensors").is_file()
    assert (tmp_path / "checkpoints" / "llava-hive-pretrain" / "mm_projector.bin").is_file()
    assert (tmp_path / "checkpoints" / "llava-hive" / "model.safetensors").is_file()


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation dropped (not `-` or `_`), spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_links_to_its_own_sections_resolve():
    text = README.read_text()
    anchors = {
        github_anchor(h) for h in re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", text, flags=re.S), flags=re.M)
    }
    links = set(re.findall(r"\]\(#([^)]+)\)", text))
    assert links and not links - anchors, sorted(links - anchors)
