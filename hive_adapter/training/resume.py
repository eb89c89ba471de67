"""Which checkpoint a hive-train stage resumes from, and whether it may: the run settings saved into every
checkpoint (`checkpoints.RUN_SETTINGS`) against this run's. A resume with settings that change what a step means
would mix two runs in one stage; it is refused, naming each flag."""

from __future__ import annotations

from functools import partial
from pathlib import Path

from transformers import TrainingArguments

from ..utils.console import say as console_say
from ..utils.distributed import world_size
from .checkpoints import choose_resume_checkpoint, run_settings_of, settings_changed, why_incomplete
from .cli_arguments import COMMAND, DataArguments
from .stages import StageSpec

say = partial(console_say, COMMAND)


def run_settings(
    args: TrainingArguments,
    data_args: DataArguments,
    *,
    num_samples: int,
    hive_learning_rate: float | None,
    vision_learning_rate: float | None = None,
) -> dict:
    """What one optimiser step of this stage means: samples per step and how they are split, the rates and the
    schedule, the data. Saved into every checkpoint; a resume compares (`check_resume_settings`)."""
    ranks = world_size()
    data = (
        {key: getattr(data_args, key) for key in ("synthetic_size", "synthetic_seed", "synthetic_attributes")}
        if data_args.data_path is None
        else {"data_path": f"{Path(data_args.data_path).name} ({num_samples} samples)"}
    )
    return {
        "global_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * ranks,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "world_size": ranks,
        "learning_rate": args.learning_rate,
        "hive_learning_rate": hive_learning_rate,
        "vision_learning_rate": vision_learning_rate,
        "max_steps": args.max_steps if args.max_steps > 0 else None,
        "num_train_epochs": args.num_train_epochs if args.max_steps <= 0 else None,
        "warmup_steps": args.warmup_steps,
        "lr_scheduler_type": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
        "weight_decay": args.weight_decay,
        "adam_beta1": args.adam_beta1,
        "adam_beta2": args.adam_beta2,
        "max_grad_norm": args.max_grad_norm,
        "seed": args.seed,
        "max_text_length": data_args.max_text_length,
        "packing_length": data_args.packed_row_length,
        **data,
    }


def check_resume_settings(checkpoint: Path, settings: dict, stage: StageSpec) -> None:
    """Refuse a resume whose settings change what a step means (naming each flag, now and then); say when only
    the split of the same global batch over ranks, micro-batches and accumulation, or its packing, changed."""
    saved = run_settings_of(checkpoint)
    if saved is None:
        say(f"stage {stage.number}: {checkpoint} carries no run settings (hive-adapter 0.2): not checked against these")
        return
    refused, split = settings_changed(saved, settings)
    if refused:
        raise ValueError(
            f"--resume_from_checkpoint: {checkpoint} was saved by a run with other settings: {'; '.join(refused)}. "
            f"Resuming would mix two runs in stage {stage.number}: give the checkpoint's values again, or start "
            f"the stage over (move {checkpoint.parent} away)"
        )
    if split:

        def rows(values: dict) -> str:
            length = values.get("packing_length")
            return "padded rows" if length is None else f"packed rows of {length}"

        def shown(values: dict) -> str:
            ranks = values["world_size"]
            return (
                f"{values['per_device_train_batch_size']} x {values['gradient_accumulation_steps']} x {ranks}, "
                f"{rows(values)}"
            )

        ranks = settings["world_size"]
        say(
            f"stage {stage.number}: resuming with per-device batch {settings['per_device_train_batch_size']} x "
            f"{settings['gradient_accumulation_steps']} accumulation x {ranks} rank{'s' if ranks > 1 else ''}, "
            f"{rows(settings)} (the checkpoint: {shown(saved)}): the same global batch of "
            f"{settings['global_batch_size']}, so each step still sees the same samples"
        )


def resume_point(requested: str | None, checkpoints: Path, stage: StageSpec, settings: dict) -> str | None:
    """The checkpoint `--resume_from_checkpoint` means for this stage: `auto` is the newest one complete now
    (said which, or why none); an explicit path must be complete now. Either must have been saved with the same
    run settings."""
    if not requested or requested in ("False", "false"):
        return None
    if requested in ("auto", "true", "True"):
        choice = choose_resume_checkpoint(checkpoints)
        say(f"stage {stage.number}: {choice.explain(checkpoints)}")
        if choice.checkpoint is None:
            return None
        check_resume_settings(choice.checkpoint, settings, stage)
        return str(choice.checkpoint)
    reason = why_incomplete(Path(requested)) if Path(requested).is_dir() else "no such directory"
    if reason:
        raise ValueError(f"--resume_from_checkpoint {requested}: {reason}; pass auto to take the newest complete one")
    check_resume_settings(Path(requested), settings, stage)
    say(f"stage {stage.number}: resuming from {requested}")
    return requested
