"""The README's "Serve at scale: vLLM" block runs as written in vLLM's world, in a scratch directory."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
BLOCKS = [b for b in re.findall(r"```bash\n(.*?)```", README, flags=re.S) if b.startswith("# (tested: vllm)")]


def test_readme_vllm_block_runs(tmp_path):
    assert len(BLOCKS) == 1
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", BLOCKS[0]], cwd=tmp_path, capture_output=True,
                            text=True, env=env, timeout=900)  # fmt: skip
    assert result.returncode == 0, BLOCKS[0] + result.stdout[-2000:] + result.stderr[-3000:]
    answers = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(answers) >= 2, result.stdout  # one from the engine, one from the server
    assert "Application startup complete" in (tmp_path / "vllm.log").read_text()
