"""A hive-train run killed right after a complete checkpoint, resumed, and compared with an uninterrupted run."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

KILL_DRIVER = """
import os, sys
from hive_adapter.training import checkpoints, train
original = checkpoints.mark_complete
def mark_complete(folder, step):
    original(folder, step)
    if step == {kill_at}:
        os._exit(9)  # killed right after a complete checkpoint
checkpoints.mark_complete = mark_complete
train.main(sys.argv[1:])
"""


def resumes_to_the_same_bytes(
    arguments: Callable[[Path], list[str]], tmp_path: Path, *, stage: int, kill_at: int, env: dict
) -> subprocess.CompletedProcess:
    """Train `arguments(out)` straight through; again killed after checkpoint `kill_at`, then resumed with
    `--resume_from_checkpoint auto`. The stage's weights must be the same bytes, its losses the same numbers.
    Returns the resumed run (its stdout says what it resumed from)."""

    def train(*args, driver: list[str] | None = None) -> subprocess.CompletedProcess:
        command = [sys.executable, *(driver or ["-m", "hive_adapter.training.train"]), *map(str, args)]
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)

    def finished(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
        return result

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    finished(train(*arguments(straight)))
    driver = tmp_path / "driver.py"
    driver.write_text(KILL_DRIVER.format(kill_at=kill_at))
    crashed = train(*arguments(killed), driver=[str(driver)])
    assert crashed.returncode == 9, crashed.stderr[-3000:]
    assert not (killed / f"stage{stage}").exists()  # an unfinished stage never looks finished
    resumed = finished(train(*arguments(killed), "--resume_from_checkpoint", "auto"))
    assert "resuming from" in resumed.stdout and f"checkpoint-{kill_at}" in resumed.stdout
    want = load_file(straight / f"stage{stage}" / "model.safetensors")
    got = load_file(killed / f"stage{stage}" / "model.safetensors")
    assert got.keys() == want.keys()
    for key, tensor in want.items():
        assert torch.equal(got[key], tensor), key  # byte for byte
    losses = [
        json.loads((out / f"stage{stage}" / "hive_stage.json").read_text())["losses"] for out in (straight, killed)
    ]
    assert losses[0] == losses[1]
    return resumed
