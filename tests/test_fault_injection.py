"""hive-train killed at any moment, inside checkpoint saving and rotation too, resumes to the same model.

Short version (in `make test`): one run is killed at four chosen moments in a row: in the middle of writing
a checkpoint, after a checkpoint is marked complete but before the older one is deleted, in the middle of
deleting the older one (marker gone, files half there), and in the middle of installing the finished stage.
After each kill, `--resume_from_checkpoint auto` continues; the final model must be byte-identical to an
uninterrupted run's.

Soak version (`pytest -m fault_soak --fault-soak tests/test_fault_injection.py`): 20 `kill -9` at random moments.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hive_adapter.data.synthetic import caption_vocabulary
from hive_adapter.tools.toy_models import ToySizes, write_toy_models

SMALL = ToySizes(image_size=32, patch_size=8, vision_width=32, vision_layers=4, text_width=64, text_layers=2)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
KILLED = 9

# Runs hive-train with `owner.name` replaced: at its `nth` call, `before` runs, then the process ends like a
# `kill -9` (no cleanup, no exit handlers).
DRIVER = """
import os, sys
import transformers
from hive_adapter.training import checkpoints, stage_inputs, stage_run, train
from hive_adapter.utils import outputs
owner, name, nth = {owner}, {name!r}, {nth}
original, calls = getattr(owner, name), [0]
def dying(*args, **kwargs):
    calls[0] += 1
    if calls[0] == nth:
        {before}
        os._exit({killed})
    return original(*args, **kwargs)
setattr(owner, name, dying)
if owner is outputs:  # hive-train's modules imported the name
    for user in (stage_inputs, stage_run):
        if hasattr(user, name):
            setattr(user, name, dying)
train.main(sys.argv[1:])
"""

# One run, killed at each point in turn (each count is of calls in that resumed process); 10 steps, a
# checkpoint every 2, one kept.
KILL_POINTS = {
    # the checkpoint of step 4 has its model written, not its optimizer state (checkpoint-2 is complete)
    "mid-checkpoint": dict(owner="transformers.Trainer", name="_save_optimizer_and_scheduler", nth=2, before="pass"),
    # the next checkpoint is marked complete, the older one not yet deleted
    "before-rotation": dict(owner="checkpoints", name="rotate", nth=1, before="pass"),
    # deleting an older checkpoint: its marker and part of its files are gone
    "mid-rotation": dict(
        owner="checkpoints",
        name="delete_checkpoint",
        nth=1,
        before="(args[0] / checkpoints.CHECKPOINT_COMPLETE).unlink(); (args[0] / 'optimizer.pt').unlink()",
    ),
    # the finished stage is written aside, not yet renamed into place
    "mid-install": dict(owner="outputs", name="install", nth=1, before="pass"),
}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_toy_models(tmp_path_factory.mktemp("toy"), caption_vocabulary(), sizes=SMALL)


def arguments(toy, output_dir: Path) -> list[str]:
    vision, language = toy
    return [str(a) for a in [
        "--vision_model", vision, "--language_model", language, "--data_format", "synthetic", "--synthetic_size", 40,
        "--stage", "1", "--global_batch_size", 4, "--per_device_train_batch_size", 4, "--hive_tokens_per_level", 4,
        "--save_strategy", "steps", "--save_steps", 2, "--save_total_limit", 1, "--logging_steps", 1,
        "--report_to", "none", "--seed", 0, "--disable_tqdm", "True", "--output_dir", output_dir,
    ]]  # fmt: skip


def hive_train(args: list[str], *, driver: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    command = [sys.executable, str(driver)] if driver else [sys.executable, "-m", "hive_adapter.training.train"]
    return subprocess.run([*command, *args], capture_output=True, text=True, env=ENV, timeout=timeout)


def final_weights(output_dir: Path) -> bytes:
    return (output_dir / "stage1" / "model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def reference(toy, tmp_path_factory) -> bytes:
    out = tmp_path_factory.mktemp("uninterrupted")
    result = hive_train(arguments(toy, out))
    assert result.returncode == 0, result.stderr[-3000:]
    return final_weights(out)


def test_kills_inside_saving_and_rotation_resume_to_the_same_model(toy, reference, tmp_path):
    out = tmp_path / "run"
    for point, spec in KILL_POINTS.items():
        driver = tmp_path / f"{point}.py"
        driver.write_text(DRIVER.format(**spec, killed=KILLED))
        resume = ["--resume_from_checkpoint", "auto"] if (out / "stage1-checkpoints").exists() else []
        killed = hive_train([*arguments(toy, out), *resume], driver=driver)
        assert killed.returncode == KILLED, f"{point}: {killed.stdout[-2000:]}{killed.stderr[-3000:]}"
        assert not (out / "stage1").exists(), f"{point}: an unfinished stage looks finished"
    resumed = hive_train([*arguments(toy, out), "--resume_from_checkpoint", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    assert final_weights(out) == reference


# Runs hive-train with the loss of one step made NaN (as an fp16 overflow or a poisoned batch would make it): the
# backward then fills every gradient with NaN, which clipping and the optimiser would write into the weights.
NAN_DRIVER = """
import sys
from hive_adapter.training import train
from hive_adapter.training.trainer import HiveTrainer
original = HiveTrainer.compute_loss
def poisoned(self, *args, **kwargs):
    loss = original(self, *args, **kwargs)
    return loss * float("nan") if self.state.global_step == {after} else loss
HiveTrainer.compute_loss = poisoned
train.cli()
"""


def test_a_nan_mid_stage_stops_the_stage_keeps_the_last_good_checkpoint_and_resumes(toy, reference, tmp_path):
    from safetensors.torch import load_file

    from hive_adapter.training.checkpoints import why_incomplete

    out = tmp_path / "run"
    driver = tmp_path / "nan.py"
    driver.write_text(NAN_DRIVER.format(after=4))  # step 5's loss is NaN; checkpoint-4 was saved before it
    diverged = hive_train(arguments(toy, out), driver=driver)
    assert diverged.returncode == 2, diverged.stdout[-2000:] + diverged.stderr[-3000:]
    assert "stage 1 diverged at step 5 of 10: loss nan" in diverged.stderr
    assert "checkpoint-4" in diverged.stderr and "done:" not in diverged.stdout
    assert not (out / "stage1").exists(), "a diverged stage was installed"
    checkpoint = out / "stage1-checkpoints" / "checkpoint-4"
    assert why_incomplete(checkpoint) is None
    weights = load_file(str(checkpoint / "model.safetensors"))
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())
    assert not (out / "stage1-checkpoints" / "checkpoint-6").exists()
    resumed = hive_train([*arguments(toy, out), "--resume_from_checkpoint", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "checkpoint-4" in resumed.stdout
    assert final_weights(out) == reference  # the NaN step left no trace


@pytest.mark.fault_soak
def test_twenty_random_kills_resume_to_the_same_model(toy, tmp_path):
    """100 steps with a checkpoint every 2 (saving and rotating about half of the time); each kill lands at a
    random moment between the end of start-up and the end of an uninterrupted run."""
    longer = ["--synthetic_size", "400"]
    started = time.time()
    straight = tmp_path / "uninterrupted"
    assert hive_train([*arguments(toy, straight), *longer]).returncode == 0
    total = time.time() - started
    reference = final_weights(straight)
    rng, kills, runs, log = random.Random(0), 0, 0, []
    while kills < 20:
        runs += 1
        out = tmp_path / f"run{runs}"
        while True:
            resume = ["--resume_from_checkpoint", "auto"] if out.exists() else []
            process = subprocess.Popen(
                [sys.executable, "-m", "hive_adapter.training.train", *arguments(toy, out), *longer, *resume],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
            )  # fmt: skip
            delay = rng.uniform(0.4 * total, total)
            try:
                stdout, stderr = process.communicate(timeout=delay)
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGKILL)
                process.communicate()
                kills += 1
                saved = sorted(p.name for p in (out / "stage1-checkpoints").glob("checkpoint-*"))
                log.append(f"run {runs}: kill {kills} after {delay:.1f} s, checkpoints on disk {saved}")
                assert not (out / "stage1").exists() or (out / "stage1" / "hive_stage.json").is_file()
                continue
            assert process.returncode == 0, "\n".join(log) + f"\n{stdout[-2000:]}\n{stderr[-3000:]}"
            resumed = [line for line in stdout.splitlines() if "resuming from" in line or "no complete" in line]
            assert final_weights(out) == reference, f"run {runs} differs after: {log}"
            log.append(f"run {runs}: finished byte-identical ({'; '.join(resumed) or 'no resume needed'})")
            break
    print("\n".join(log))
