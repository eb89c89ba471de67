"""What hive-reproduce writes and reuses, and how it trains (`reproduce`): the output directory it may write into,
the work directory whose checkpoints it may reuse (only those of the same budget), the toy models pre-trained the
way real checkpoints come, and the stages run through `hive-train`."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

from ..data.synthetic import caption_vocabulary
from ..tools.toy_models import PRETRAINING_RECORD, write_toy_models
from ..tools.toy_pretraining import ToyPretraining
from ..utils.console import say as console_say
from ..utils.outputs import write_file
from .reproduce_settings import COMMAND, FIGURE_FILES, HIVE_FLAGS, REPORT_FILES, WORK_RECORD, Budget

say = partial(console_say, COMMAND)


def check_output_dir(out: Path) -> None:
    """Refuse, before any work, an --output_dir whose report or figures were not written by hive-reproduce
    (its reproduce.json names the command); an earlier run's are replaced, and said so."""
    if out.exists() and not out.is_dir():
        raise SystemExit(f"[{COMMAND}] error: --output_dir {out} is a file; give a directory")
    present = [name for name in (*REPORT_FILES, *FIGURE_FILES) if (out / name).exists()]
    if not present:
        return
    try:
        ours = str(json.loads((out / "reproduce.json").read_text()).get("command", "")).startswith(COMMAND)
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise SystemExit(
            f"[{COMMAND}] error: --output_dir {out} holds {', '.join(present)}, not written by {COMMAND} (no "
            "reproduce.json naming it); choose a new or empty directory, nothing was changed"
        )
    say(f"{out} holds an earlier {COMMAND} report: its {', '.join(present)} will be replaced")


def work_settings(args: argparse.Namespace, budget: Budget) -> dict:
    """What the models and stages in --work_dir depend on (seeds and connectors have directories of their own)."""
    return {
        "language_pretraining_steps": budget.language_pretraining_steps,
        "vision_pretraining_steps": budget.vision_pretraining_steps,
        "train_size": budget.train_size,
        "batch_size": args.batch_size,
        "hive_learning_rate": args.hive_learning_rate,
        "hive_flags": " ".join(HIVE_FLAGS),
        "moving_vision_learning_rate": budget.moving_vision_learning_rate,
        "moving_stage3_epochs": budget.moving_stage3_epochs,
    }


def claim_work_dir(work: Path, settings: dict) -> None:
    """Use `work` for checkpoints: new or empty (the settings are recorded), or an earlier run's with the same
    settings (its models and stages are reused); anything else is refused naming the difference."""
    if work.exists() and not work.is_dir():
        raise SystemExit(f"[{COMMAND}] error: --work_dir {work} is a file; give a directory")
    record = work / WORK_RECORD
    if work.is_dir() and any(work.iterdir()):
        try:
            recorded = json.loads(record.read_text())
        except (OSError, ValueError):
            raise SystemExit(
                f"[{COMMAND}] error: --work_dir {work} is not empty and was not written by {COMMAND} (no "
                f"{WORK_RECORD}); give a new or empty directory"
            ) from None
        changed = [
            f"{key}: {recorded.get(key)} there, {value} asked"
            for key, value in settings.items()
            if recorded.get(key) != value
        ]
        if changed:
            raise SystemExit(
                f"[{COMMAND}] error: --work_dir {work} holds models and stages trained with other settings ("
                f"{'; '.join(changed)}); reusing them would report one budget under another. Give a new --work_dir, "
                "or the settings it was run with"
            )
        say(f"reusing the models and finished stages in {work} (same settings)")
        return
    work.mkdir(parents=True, exist_ok=True)
    write_file(record, lambda path: path.write_text(json.dumps(settings, indent=2)))


# ---------------------------------------------------------------------- models and training
def prepare_models(directory: Path, *, seed: int, language_steps: int, vision_steps: int) -> Path:
    """Tiny stand-ins for the two checkpoints (seeded), pre-trained as asked; reused when already written."""
    if (directory / PRETRAINING_RECORD).is_file():
        return directory
    settings = ToyPretraining(language_steps=language_steps, vision_steps=vision_steps)
    write_toy_models(directory, caption_vocabulary(), seed=seed, pretraining=settings)
    return directory


def hive_train(
    connector: str,
    models: Path,
    run: Path,
    *,
    seed: int,
    train_size: int,
    batch_size: int,
    flags: list[str] = (),
    stages: str = "all",
    start: Path | None = None,
    label: str | None = None,
) -> Path:
    """`hive-train` of one connector (the three stages by default) from the stand-ins in `models`, or from the
    HIVE checkpoint `start`; returns the stage-3 directory (finished stages are reused)."""
    source = ["--model_name_or_path", str(start)] if start is not None else [
        "--vision_model", str(models / "vision"), "--language_model", str(models / "language"),
        "--vision_connector", connector, *HIVE_FLAGS,
    ]  # fmt: skip
    command = [
        sys.executable, "-m", "hive_adapter.training.train", *source,
        "--data_format", "synthetic", "--synthetic_size", str(train_size), "--synthetic_seed", str(seed),
        "--stage", stages, "--output_dir", str(run), "--global_batch_size", str(batch_size),
        "--per_device_train_batch_size", str(batch_size), "--save_strategy", "no", "--report_to", "none",
        "--seed", str(seed), "--disable_tqdm", "True", *flags,
    ]  # fmt: skip
    started = time.time()
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        sys.stderr.write(completed.stdout[-4000:] + completed.stderr[-4000:])
        raise SystemExit(f"hive-train failed for connector {label or connector!r} (exit {completed.returncode})")
    say(f"  {label or connector}: stages {stages} trained in {time.time() - started:.0f} s")
    return run / "stage3"


def stage_report(run: Path, stage: int) -> dict:
    return json.loads((run / f"stage{stage}" / "hive_stage.json").read_text())


def seconds_per_step(report: dict) -> float:
    runtime = next(entry["train_runtime"] for entry in reversed(report["log_history"]) if "train_runtime" in entry)
    return runtime / max(1, report["global_steps"])
