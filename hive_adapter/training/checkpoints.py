"""Trainer checkpoints that a resume can trust, whenever the run was killed.

The HF Trainer writes `checkpoint-N/` in place and then deletes older checkpoints (`--save_total_limit`);
a kill between the two, or during either, leaves a directory that looks like a checkpoint but is not one,
or no whole checkpoint at all. Here:

- a checkpoint is marked complete (`hive_checkpoint_complete`, listing every file and its size) only after
  every rank has written its part and the files a resume needs are there: trainer state, model weights,
  optimizer and scheduler state, each rank's RNG state;
- older checkpoints are deleted only after the new one is marked, marker first, so at every moment at least
  one complete checkpoint exists;
- a resume takes the newest checkpoint that is complete *now* (marker present, every listed file there with
  its size) and says which; when there is none it says why for each one it skipped.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

CHECKPOINT_COMPLETE = "hive_checkpoint_complete"
# What a step of the run meant (global batch, rates, schedule, data), written into every checkpoint: a resume
# with other values would mix two runs in one stage (`settings_changed`).
RUN_SETTINGS = "hive_run_settings.json"
# Settings whose change keeps what a step means: the same samples per step, split otherwise over ranks,
# micro-batches and accumulation, or packed otherwise into rows (said when they change, not refused).
BATCH_SPLIT = ("per_device_train_batch_size", "gradient_accumulation_steps", "world_size", "packing_length")
CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)$")


def _files(folder: Path) -> dict[str, int]:
    """Relative path -> size of every file under `folder` but the marker."""
    return {
        str(path.relative_to(folder)): path.stat().st_size
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != CHECKPOINT_COMPLETE
    }


def missing_for_resume(folder: Path, ranks: int) -> list[str]:
    """What a resume needs that `folder` lacks (empty: nothing)."""
    names = set(_files(folder))
    deepspeed = (folder / "latest").is_file()
    missing = []
    if "trainer_state.json" not in names:
        missing.append("trainer_state.json")
    # whole weights, or FSDP's sharded ones (torch.distributed.checkpoint: a directory with its .metadata)
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model_fsdp.bin")
    if not deepspeed and not names & set(weights) and "pytorch_model_fsdp_0/.metadata" not in names:
        missing.append("model weights (model.safetensors, or FSDP's pytorch_model_fsdp_0/)")
    if deepspeed:
        tag = (folder / "latest").read_text().strip()
        if not any(name.startswith(f"{tag}/") and name.endswith("optim_states.pt") for name in names):
            missing.append(f"DeepSpeed optimizer states ({tag}/*optim_states.pt)")
    elif not names & {"optimizer.pt", "optimizer.bin", "optimizer_0/.metadata"}:
        missing.append("optimizer state (optimizer.pt, or FSDP's optimizer_0/)")
    if not deepspeed and "scheduler.pt" not in names:
        missing.append("scheduler.pt")
    rng = {"rng_state.pth"} if ranks == 1 else {f"rng_state_{rank}.pth" for rank in range(ranks)}
    if not rng <= names:
        missing.append(", ".join(sorted(rng - names)))
    return missing


def mark_complete(folder: Path, step: int) -> None:
    """Record `folder`'s files and sizes: from now on it counts as complete while they are all there."""
    tmp = folder / f".{CHECKPOINT_COMPLETE}.tmp"
    tmp.write_text(json.dumps({"global_step": step, "files": _files(folder)}, indent=1))
    os.replace(tmp, folder / CHECKPOINT_COMPLETE)


def why_incomplete(folder: Path) -> str | None:
    """None if `folder` is a complete checkpoint now, else the reason it is not."""
    marker = folder / CHECKPOINT_COMPLETE
    if not marker.is_file():
        return "no completion marker (cut short while saving, or a save that lacked optimizer state)"
    try:
        recorded = json.loads(marker.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"unreadable {CHECKPOINT_COMPLETE}"
    now = _files(folder)
    gone = [name for name in recorded if name not in now]
    if gone:
        return f"{len(gone)} of its files are gone ({', '.join(gone[:3])}): deleted or moved after it was saved"
    changed = [name for name, size in recorded.items() if now[name] != size]
    if changed:
        return f"{', '.join(changed[:3])} changed size after it was saved"
    return None


def checkpoints_in(directory: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every `checkpoint-N` in `directory`, newest first."""
    if not directory.is_dir():
        return []
    found = [(int(m[1]), path) for path in directory.iterdir() if (m := CHECKPOINT_NAME.match(path.name))]
    return sorted(found, reverse=True)


@dataclass
class ResumeChoice:
    checkpoint: Path | None
    skipped: list[str]  # "checkpoint-12: <why>", newest first

    def explain(self, directory: Path) -> str:
        if self.checkpoint is not None:
            note = f" (newer, skipped: {'; '.join(self.skipped)})" if self.skipped else ""
            return f"resuming from {self.checkpoint}{note}"
        if not self.skipped:
            return f"no checkpoint in {directory}: starting from the beginning"
        return f"no complete checkpoint in {directory} ({'; '.join(self.skipped)}): starting from the beginning"


def choose_resume_checkpoint(directory: Path) -> ResumeChoice:
    """The newest checkpoint in `directory` that is complete now, and why each newer one was skipped."""
    skipped = []
    for _, folder in checkpoints_in(directory):
        reason = why_incomplete(folder)
        if reason is None:
            return ResumeChoice(folder, skipped)
        skipped.append(f"{folder.name}: {reason}")
    return ResumeChoice(None, skipped)


def delete_checkpoint(folder: Path) -> None:
    """Marker first: a kill while the files go leaves a folder no resume will take."""
    (folder / CHECKPOINT_COMPLETE).unlink(missing_ok=True)
    shutil.rmtree(folder)


def rotate(directory: Path, keep: int | None) -> None:
    """Keep the newest `keep` complete checkpoints; delete older ones and torn folders older than the newest
    complete one. Never touches the newest complete checkpoint."""
    complete = [(step, folder) for step, folder in checkpoints_in(directory) if why_incomplete(folder) is None]
    if not complete:
        return
    newest = complete[0][0]
    kept = {folder for _, folder in complete[: keep or len(complete)]}
    for step, folder in checkpoints_in(directory):
        if folder not in kept and step <= newest and folder != complete[0][1]:
            logger.info("deleting %s (--save_total_limit %s)", folder, keep)
            delete_checkpoint(folder)


def write_run_settings(folder: Path, settings: dict) -> None:
    (folder / RUN_SETTINGS).write_text(json.dumps(settings, indent=1, sort_keys=True))


def run_settings_of(folder: Path) -> dict | None:
    """The run settings a checkpoint was saved under, or None (a checkpoint of hive-adapter 0.2)."""
    try:
        return json.loads((folder / RUN_SETTINGS).read_text())
    except (OSError, ValueError):
        return None


def settings_changed(saved: dict, now: dict) -> tuple[list[str], list[str]]:
    """(refused, split): the settings that change what a step means, as `--flag now (the checkpoint: saved)`,
    and the batch-split settings that differ (same global batch, another split)."""
    refused = [
        f"--{key} {_shown(now.get(key))} (the checkpoint: {_shown(saved.get(key))})"
        for key in sorted({*saved, *now})
        if key not in BATCH_SPLIT and saved.get(key) != now.get(key)
    ]
    split = [key for key in BATCH_SPLIT if saved.get(key) != now.get(key)]
    return refused, split


def _shown(value) -> str:
    return "unset" if value is None else f"{value:g}" if isinstance(value, float) else str(value)
