"""One hive-train stage, run and written: its Trainer arguments (Table 3's stage settings scaled to the run), the
training itself, and the stage directory (weights read back and checked finite, the processor, `hive_stage.json`),
installed only when complete."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from functools import partial
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, PrinterCallback, TrainingArguments

from ..data.collator import HiveCaptionCollator, with_pad_token
from ..data.conversations import HiveConversationCollator, drop_cut_images
from ..model.cross_attention import HiveCrossAttention
from ..model.parameters import non_finite_tensors_in
from ..model.processing_hive import HiveProcessor
from ..utils.console import on_a_terminal
from ..utils.console import say as console_say
from ..utils.distributed import any_rank, barrier, rank_fingerprints, world_size
from ..utils.outputs import install, partial_path, start_partial
from .cli_arguments import COMMAND, DataArguments, StageArguments
from .plan import STAGE_REPORT
from .resume import resume_point, run_settings
from .stage_inputs import load_stage_model, marker_mode
from .stages import SFT, StageSpec, apply_stage
from .trainer import HiveTrainer, StepLines, TrainingDiverged

say = partial(console_say, COMMAND)


def stage_arguments(
    base: TrainingArguments,
    stage: StageSpec,
    *,
    num_samples: int,
    global_batch_size: int | None,
    explicit: set[str],
    output_dir: Path,
    deepspeed: str | None,
) -> TrainingArguments:
    """The stage's Table 3 defaults scaled to this run; explicitly given flags are left alone."""
    ranks = world_size()
    per_device = base.per_device_train_batch_size
    if "gradient_accumulation_steps" in explicit:
        accumulation = base.gradient_accumulation_steps
    else:
        wanted = global_batch_size or stage.global_batch_size
        if wanted % (per_device * ranks):
            raise ValueError(
                f"global batch {wanted} is not a multiple of per_device_train_batch_size={per_device} x {ranks} ranks"
            )
        accumulation = wanted // (per_device * ranks)
    epochs = base.num_train_epochs if "num_train_epochs" in explicit else stage.epochs
    steps_per_epoch = max(1, math.ceil(num_samples / (per_device * ranks * accumulation)))
    total_steps = base.max_steps if base.max_steps > 0 else math.ceil(steps_per_epoch * epochs)
    defaults = {
        "learning_rate": stage.peak_lr,
        "adam_beta1": stage.betas[0],
        "adam_beta2": stage.betas[1],
        "weight_decay": stage.weight_decay,
        "max_grad_norm": stage.max_grad_norm,
        "num_train_epochs": epochs,
        "warmup_steps": stage.warmup_steps(total_steps),
        "lr_scheduler_type": "cosine_with_min_lr",
        "logging_steps": max(1, total_steps // 25),
    }
    overrides = {key: value for key, value in defaults.items() if key not in explicit}
    if "lr_scheduler_kwargs" not in explicit:
        # As a rate of the peak: DeepSpeed's optimiser has no `defaults["lr"]` for `min_lr` to divide by.
        peak = overrides.get("learning_rate", base.learning_rate)
        overrides["lr_scheduler_kwargs"] = {"min_lr_rate": min(1.0, stage.min_lr / peak)}
    overrides.update(
        gradient_accumulation_steps=accumulation,
        output_dir=str(output_dir),
        deepspeed=deepspeed,
        remove_unused_columns=False,
        use_cpu=base.use_cpu or not torch.cuda.is_available(),
        save_safetensors=True,
        save_total_limit=None,  # HiveTrainer rotates (keep_checkpoints), after marking the new checkpoint
    )
    if "disable_tqdm" not in explicit and not on_a_terminal():
        overrides["disable_tqdm"] = True  # a log file gets StepLines' lines, not a redrawn bar
    if base.fsdp and "state_dict_type" not in (base.fsdp_config or {}):
        # Checkpoints sharded (each rank writes its part, resumable); the stage's model is gathered on save.
        overrides["fsdp_config"] = {**(base.fsdp_config or {}), "state_dict_type": "SHARDED_STATE_DICT"}
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    return dataclasses.replace(base, **{k: v for k, v in overrides.items() if k in fields})


def run_stage(
    stage: StageSpec,
    *,
    previous: Path,
    final: Path,
    base_args: TrainingArguments,
    stage_args: StageArguments,
    data_args: DataArguments,
    dataset,
    explicit: set[str],
    deepspeed: str | None,
    attn_implementation: str | None = None,
) -> dict:
    checkpoints = final.with_name(f"{final.name}-checkpoints")
    # The previous stage's processor (a directory written before processors were saved gets one built from its
    # tokenizer and image processor) travels on, with any chat template the user put in it.
    processor = HiveProcessor.from_pretrained(previous)
    tokenizer, image_processor = with_pad_token(processor.tokenizer), processor.image_processor
    instruct = stage.number == SFT.number
    config = AutoConfig.from_pretrained(previous)
    if instruct:
        processor, config = marker_mode(processor, config)
        dataset = drop_cut_images(
            dataset, processor, data_args.max_text_length, drop_cut_conversations=data_args.drop_cut_conversations
        )
    args = stage_arguments(
        base_args,
        stage,
        num_samples=len(dataset),
        global_batch_size=stage_args.global_batch_size,
        explicit=explicit,
        output_dir=checkpoints,
        deepspeed=deepspeed,
    )
    # After TrainingArguments: under ZeRO-3 the model is built partitioned (HIVE modules included).
    model = load_stage_model(previous, config, attn_implementation=attn_implementation)
    counts = apply_stage(model, stage)
    if base_args.gradient_checkpointing:
        model.config.use_cache = False
    if instruct:
        collator = HiveConversationCollator(
            processor, max_length=data_args.max_text_length, packing_length=data_args.packed_row_length
        )
    else:
        collator = HiveCaptionCollator(
            tokenizer, image_processor, max_length=data_args.max_text_length, packing_length=data_args.packed_row_length
        )
    packing_length = collator.packing_length
    # Stage 1 trains HIVE's modules alone: its own rate is theirs.
    hive_learning_rate = stage_args.hive_learning_rate if set(stage.trains) != {"hive"} else None
    vision_learning_rate = stage_args.vision_learning_rate if "vision" in stage.trains else None
    settings = run_settings(
        args,
        data_args,
        num_samples=len(dataset),
        hive_learning_rate=hive_learning_rate,
        vision_learning_rate=vision_learning_rate,
    )
    trainer = HiveTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        keep_checkpoints=base_args.save_total_limit,
        hive_learning_rate=hive_learning_rate,
        vision_learning_rate=vision_learning_rate,
        label=f"stage {stage.number}",
        run_settings=settings,
    )
    if args.disable_tqdm:
        trainer.remove_callback(PrinterCallback)  # its dict per logging step, replaced by one short line
        trainer.add_callback(StepLines(f"stage {stage.number}"))
    resume = resume_point(base_args.resume_from_checkpoint, checkpoints, stage, settings)
    trainable = sum(t for t, _ in counts.values())
    say(
        f"stage {stage.number} ({stage.name}) from {previous}: {trainable:,} trainable parameters, "
        f"lr {args.learning_rate:g} -> {stage.min_lr:g}, betas ({args.adam_beta1}, {args.adam_beta2}), "
        f"global batch {args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size()}, "
        f"warmup {args.warmup_steps} steps, clip {args.max_grad_norm}"
        + (f", HIVE modules at lr {hive_learning_rate:g}" if hive_learning_rate is not None else "")
        + (f", vision encoder at lr {vision_learning_rate:g}" if vision_learning_rate is not None else "")
        + (f", packed rows of {packing_length} tokens" if packing_length is not None else "")
    )
    result = trainer.train(resume_from_checkpoint=resume)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    report = {
        "stage": stage.number,
        "name": stage.name,
        "started_from": str(previous),
        "trainable_parameters": {part: {"trainable": t, "total": n} for part, (t, n) in counts.items()},
        "global_steps": trainer.state.global_step,
        "losses": losses,
        "log_history": trainer.state.log_history,
        "train_loss": result.training_loss,
        "learning_rate": args.learning_rate,
        "hive_learning_rate": hive_learning_rate,
        "vision_learning_rate": vision_learning_rate,
        "skipped_images": getattr(dataset, "skipped", 0),
        "cut_conversations": list(getattr(dataset, "cut", [])),
        "world_size": world_size(),
        "deepspeed": deepspeed,
        "packing_length": packing_length,
        "attn_implementation": attention_kernels(model),
    }
    if stage_args.verify_rank_consistency:
        report["rank_fingerprints"] = rank_fingerprints(trainer.model)
    tmp = partial_path(final)
    if trainer.is_world_process_zero():
        start_partial(final, command=COMMAND)
    barrier()
    trainer.save_whole_model(tmp)  # ZeRO-3 partitions and FSDP shards gathered into one safetensors file
    # The last line of defence against a diverged run (the step guard stops most): weights are read back as
    # written, and a stage holding NaN or inf is never installed.
    bad = non_finite_tensors_in(tmp) if trainer.is_world_process_zero() else []
    if any_rank(bool(bad)):
        if trainer.is_world_process_zero():
            shutil.rmtree(tmp, ignore_errors=True)
        raise TrainingDiverged(
            f"stage {stage.number} diverged by step {trainer.state.global_step}: its weights hold NaN or inf "
            f"({len(bad) or 'some'} tensors{', e.g. ' + ', '.join(bad[:3]) if bad else ''}); the stage is not "
            f"installed; {trainer.newest_checkpoint_note()}"
        )
    if trainer.is_world_process_zero():
        if not (tmp / "model.safetensors").is_file() and not (tmp / "model.safetensors.index.json").is_file():
            raise RuntimeError(
                f"stage {stage.number}: no model weights were written to {tmp}; the stage is not installed"
            )
        processor.save_pretrained(tmp)
        (tmp / STAGE_REPORT).write_text(json.dumps(report, indent=2))
        install(tmp, final, command=COMMAND)
        if report["skipped_images"]:
            say(f"stage {stage.number}: skipped {report['skipped_images']} samples with unreadable images")
        if report["cut_conversations"]:
            say(
                f"stage {stage.number}: {len(report['cut_conversations'])} conversations were cut by "
                f"--max_text_length {data_args.max_text_length} (named in {STAGE_REPORT})"
            )
    barrier()
    del trainer, model
    return report


def attention_kernels(model: nn.Module) -> dict[str, object]:
    """What runs: the language model's attention implementation and HIVE's cross-attention kernels."""
    kernels = sorted({m.implementation for m in model.modules() if isinstance(m, HiveCrossAttention)})
    return {"language_model": model.language_model.config._attn_implementation, "hive": kernels}
