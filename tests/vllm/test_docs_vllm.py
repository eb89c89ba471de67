"""The vLLM guide's `# (tested: vllm)` block (docs/guides/vllm.md) runs as written in vLLM's world, in a scratch
directory (tests/doc_blocks.py, the runner of every tested block)."""

from __future__ import annotations

import os

from doc_blocks import DOCS, run_shell_blocks, shell_blocks

BLOCKS = shell_blocks(DOCS / "guides" / "vllm.md", "# (tested: vllm)")


def test_vllm_guide_block_runs(tmp_path, monkeypatch):
    assert len(BLOCKS) == 1
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    [output] = run_shell_blocks(BLOCKS, tmp_path)
    answers = [line for line in output.splitlines() if line.strip()]
    assert len(answers) >= 2, output  # one from the engine, one from the server
    assert "Application startup complete" in (tmp_path / "vllm.log").read_text()
