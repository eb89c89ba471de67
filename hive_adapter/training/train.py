"""`hive-train`: HIVE's three-stage pre-training on the HF Trainer, with DeepSpeed ZeRO-2/3.

    hive-train --vision_model DIR --language_model DIR --data_path data.json --image_folder imgs \\
               --stage all --output_dir out/ [--deepspeed zero3] [--hive_* options]
    torchrun --nproc_per_node 2 -m hive_adapter.training.train ...        # same arguments, CPU ranks work too
    deepspeed --num_gpus 8 -m hive_adapter.training.train ... --deepspeed zero2

Layout of `--output_dir`:
    stage0/                   the composed, untrained model (vision + LLM + fresh HIVE modules)
    stage{1,2,3}/             each stage's final model (config.json, model.safetensors, its HiveProcessor:
                              tokenizer, image processor, chat template; hive_stage.json with its loss curve
                              and parameter counts)
    stage{n}-checkpoints/     Trainer checkpoints; resume with --resume_from_checkpoint auto

A stage directory appears only when the stage has finished (written aside, then renamed), so a rerun
skips finished stages (delete one to retrain it) and a kill at any moment never leaves a stage that loads
wrong; checkpoints are marked complete before older ones are deleted (`hive_adapter.training.checkpoints`). A stage
starts from the previous stage's output, and flags that contradict an existing model are refused
(`hive_adapter.training.plan`). Stage hyper-parameters come from `hive_adapter.training.stages.STAGES` (paper Table 3);
any flag given explicitly wins.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import sys
from functools import partial
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoTokenizer,
    PrinterCallback,
    TrainingArguments,
    set_seed,
)

from ..data.collator import HiveCaptionCollator, with_pad_token
from ..data.conversations import (
    ConversationDataset,
    HiveConversationCollator,
    SyntheticConversations,
    drop_cut_images,
    read_llava_instruct,
)
from ..data.datasets import ImageCaptionDataset, read_records
from ..data.supervision import supervision_report
from ..data.synthetic import SyntheticShapes, checked_attributes
from ..model.cross_attention import HiveCrossAttention
from ..model.loading import load_vision_encoder
from ..model.modeling_hive import HiveForConditionalGeneration
from ..model.parameters import non_finite_tensors_in
from ..model.processing_hive import HiveProcessor, llava_chat_template
from ..utils.console import on_a_terminal, quiet_progress_bars
from ..utils.console import say as console_say
from ..utils.distributed import (
    any_rank,
    barrier,
    exit_if_launched,
    init_distributed,
    is_main_process,
    rank_fingerprints,
    shutdown_distributed,
    world_size,
)
from ..utils.outputs import OutputRefused, install, partial_path, start_partial
from .cli_arguments import COMMAND, DataArguments, ModelArguments, StageArguments, parse_arguments
from .hive_flags import HiveArguments, hive_config_from
from .plan import (
    STAGE_REPORT,
    is_complete_stage,
    plan_stages,
    stage_report,
    validate_hive_learning_rate,
    validate_model_paths,
    validate_run_arguments,
    validate_vision_learning_rate,
)
from .resume import resume_point, run_settings
from .stages import SFT, StageSpec, apply_stage, parse_stages
from .trainer import HiveTrainer, StepLines, TrainingDiverged

logger = logging.getLogger("hive_adapter.training.train")

# ---------------------------------------------------------------------- output
say = partial(console_say, COMMAND)


# ---------------------------------------------------------------------- model, data
def compose_stage0(model_args: ModelArguments, hive_args: HiveArguments, directory: Path, *, seed: int) -> None:
    """Vision encoder + LLM + fresh zero-gated HIVE modules (initialised from `seed`), saved as a HIVE checkpoint."""
    if not (model_args.vision_model and model_args.language_model):
        raise ValueError("pass --vision_model and --language_model, or --model_name_or_path of a HIVE checkpoint")
    set_seed(seed)
    vision = load_vision_encoder(model_args.vision_model)
    language = AutoModelForCausalLM.from_pretrained(model_args.language_model)
    model = HiveForConditionalGeneration.from_vision_text(vision, language, hive_config_from(hive_args))
    tokenizer = with_pad_token(AutoTokenizer.from_pretrained(model_args.tokenizer or model_args.language_model))
    image_processor = AutoImageProcessor.from_pretrained(model_args.image_processor or model_args.vision_model)
    # Saved with every stage: AutoProcessor, pipeline("image-text-to-text") and hive-serve load it from there.
    processor = HiveProcessor.for_model(model, tokenizer=tokenizer, image_processor=image_processor)
    tmp = start_partial(directory, command=COMMAND)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    report = {
        "stage": 0,
        "connector": hive_args.vision_connector,
        "vision_model": str(Path(model_args.vision_model).resolve()),
        "language_model": str(Path(model_args.language_model).resolve()),
    }
    (tmp / STAGE_REPORT).write_text(json.dumps(report, indent=2))
    install(tmp, directory, command=COMMAND)
    say(f"composed the initial model in {directory}")


def build_dataset(data_args: DataArguments, *, image_size: int, instruct: bool = False):
    """The training set (captions; conversations for `instruct`, the sft stage); the synthetic one is drawn at the
    vision encoder's input size."""
    synthetic = data_args.data_format == "synthetic" or (
        data_args.data_path is None and data_args.data_format == "auto"
    )
    if instruct:
        if synthetic:
            return SyntheticConversations(
                data_args.synthetic_size, seed=data_args.synthetic_seed, image_size=image_size
            )
        if data_args.data_path is None:
            raise ValueError("--stage sft: pass --data_path (LLaVA's instruction JSON) or --data_format synthetic")
        if data_args.data_format not in ("auto", "llava_instruct"):
            raise ValueError(
                f"--stage sft reads conversations: --data_format {data_args.data_format!r} is pre-training data; use "
                "llava_instruct (or auto) with LLaVA's instruction JSON"
            )
        if not Path(data_args.data_path).is_file():
            raise FileNotFoundError(f"--data_path {data_args.data_path}: no such file")
        folder = data_args.image_folder or str(Path(data_args.data_path).parent)
        return ConversationDataset(read_llava_instruct(data_args.data_path), folder)
    if data_args.data_format == "llava_instruct":
        raise ValueError(
            "--data_format llava_instruct is instruction data: it trains --stage sft, after the pre-training stages"
        )
    if synthetic:
        return SyntheticShapes(
            data_args.synthetic_size,
            seed=data_args.synthetic_seed,
            image_size=image_size,
            attributes=checked_attributes(data_args.synthetic_attributes),
        )
    if data_args.data_path is None:
        raise ValueError("pass --data_path (LLaVA JSON or JSONL) or --data_format synthetic")
    records = read_records(data_args.data_path, data_args.data_format)
    folder = data_args.image_folder or str(Path(data_args.data_path).parent)
    return ImageCaptionDataset(records, folder, skip_bad_images=data_args.skip_bad_images)


# ---------------------------------------------------------------------- one stage
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


def marker_mode(processor: HiveProcessor, config):
    """The sft stage's processor and model config in marker mode: conversations hold no, one or several images,
    each at its `<image>` marker. A captioning-mode model (pre-training's default) takes the tokenizer's `<image>`
    token as its marker; the marker must already be one token of the tokenizer (the toy tokenizers have it; add
    it to a real LM's tokenizer, and resize the embeddings, before pre-training)."""
    if config.image_token_id is not None:
        return processor, config
    from ..model.processing_hive import DEFAULT_IMAGE_TOKEN

    marked = HiveProcessor(
        processor.image_processor, processor.tokenizer, chat_template=None, image_token=DEFAULT_IMAGE_TOKEN
    )
    if processor.chat_template != llava_chat_template(None):
        marked.chat_template = processor.chat_template  # a template the user chose stays theirs
    if marked.image_token_id >= config.text_config.vocab_size:
        raise ValueError(
            f"the marker {DEFAULT_IMAGE_TOKEN!r} (id {marked.image_token_id}) is outside the language model's "
            f"vocabulary of {config.text_config.vocab_size}; resize the model's embeddings for it before sft"
        )
    config.image_token_id = marked.image_token_id
    say(f"sft: the model reads images at the {DEFAULT_IMAGE_TOKEN!r} marker (id {marked.image_token_id}) from now on")
    return marked, config


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
        dataset = drop_cut_images(dataset, processor, data_args.max_text_length)
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
            say(f"stage {stage.number}: skipped {report['skipped_images']} unreadable images")
    barrier()
    del trainer, model
    return report


def load_stage_model(previous: Path, config, *, attn_implementation: str | None = None) -> HiveForConditionalGeneration:
    """The previous stage's model in float32 whatever dtype it was saved in (transformers 5 loads a checkpoint in its
    saved dtype: a bf16 stage would train bf16 weights with no float32 master copy; `--bf16` is mixed precision over
    float32 weights), with the attention kernel asked for reaching the language model and HIVE's blocks."""
    extra = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    model = HiveForConditionalGeneration.from_pretrained(previous, config=config, dtype=torch.float32, **extra)
    model.hive_follow_attn_implementation()
    return model


def attention_kernels(model: nn.Module) -> dict[str, object]:
    """What runs: the language model's attention implementation and HIVE's cross-attention kernels."""
    kernels = sorted({m.implementation for m in model.modules() if isinstance(m, HiveCrossAttention)})
    return {"language_model": model.language_model.config._attn_implementation, "hive": kernels}


# ---------------------------------------------------------------------- main
def _image_size(path: str | Path) -> int:
    config = AutoConfig.from_pretrained(path)
    vision = getattr(config, "vision_config", None) or config
    size = getattr(vision, "image_size", 64)
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def check_supervision(dataset, tokenizer_source: str | Path, max_length: int) -> None:
    """Stop a run that cannot learn (every caption truncated away) before it starts; warn when many samples lose
    their captions."""
    tokenizer = with_pad_token(AutoTokenizer.from_pretrained(tokenizer_source))
    report = supervision_report(HiveCaptionCollator(tokenizer, None, max_length=max_length), dataset.texts())
    report.check()
    say(
        f"{report.samples:,} training samples, {report.supervised_tokens:,} caption tokens to learn from"
        + (f" ({report.without_labels:,} samples have none left)" if report.without_labels else "")
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    quiet_progress_bars()
    model_args, hive_args, data_args, stage_args, base_args, deepspeed, explicit = parse_arguments(argv)
    # The [hive-train] lines tell the story; library logs below WARNING only with --log_level info / debug.
    wanted = base_args.log_level if "log_level" in explicit and base_args.log_level != "passive" else "warning"
    level = getattr(logging, wanted.upper(), logging.DEBUG)  # "detail" is DEBUG
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=level if is_main_process() else logging.WARNING,
    )
    stages = parse_stages(stage_args.stage)
    instruct = stages[0].number == SFT.number
    if data_args.max_text_length is None:
        data_args.max_text_length = 2048 if instruct else 77  # LLaVA-1.5's fine-tuning / the paper's (SigLIP's)
    validate_run_arguments(
        global_batch_size=stage_args.global_batch_size,
        training_args=base_args,
        explicit=explicit,
        deepspeed=deepspeed,
    )
    validate_hive_learning_rate(stage_args.hive_learning_rate, stages)
    validate_vision_learning_rate(stage_args.vision_learning_rate, stages)
    validate_model_paths(model_args)
    data_args.packed_row_length  # noqa: B018  (refuses --packing_length without --packing, or too short)
    hive_config_from(hive_args)  # validate the HIVE flags before any model is loaded
    checked_attributes(data_args.synthetic_attributes)
    output_dir = Path(base_args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputRefused(f"--output_dir {output_dir} is a file; give a directory")
    init_distributed(deepspeed is not None)
    output_dir.mkdir(parents=True, exist_ok=True)
    previous, compose = plan_stages(
        stages, output_dir, model_args=model_args, hive_args=hive_args, explicit=explicit, command=COMMAND
    )

    # The data, and whether it can teach anything, before a model is composed or loaded.
    source = model_args.vision_model if compose else previous
    dataset = build_dataset(data_args, image_size=_image_size(source), instruct=instruct)
    tokenizer_source = (model_args.tokenizer or model_args.language_model) if compose else previous
    if not instruct:  # conversations are checked in their stage, with the processor that renders them
        check_supervision(dataset, tokenizer_source, data_args.max_text_length)
    if compose:
        if is_main_process():
            compose_stage0(model_args, hive_args, previous, seed=base_args.seed)
        barrier()
    say(f"stages {[s.number for s in stages]}, starting from {previous}")

    reports = []
    for stage in stages:
        final = output_dir / f"stage{stage.number}"
        if is_complete_stage(final):
            say(f"stage {stage.number} already finished in {final}; skipping")
            reports.append(stage_report(final))
        else:
            reports.append(
                run_stage(
                    stage,
                    previous=previous,
                    final=final,
                    base_args=base_args,
                    stage_args=stage_args,
                    data_args=data_args,
                    dataset=dataset,
                    explicit=explicit,
                    deepspeed=deepspeed,
                    attn_implementation=model_args.attn_implementation,
                )
            )
            _reset_accelerate_state()
        previous = final

    if is_main_process():
        print("[hive-train] done:")
        for report in reports:
            losses = report.get("losses") or [float("nan")]
            print(
                f"  stage {report['stage']}: loss {losses[0]:.4f} -> {losses[-1]:.4f} over {report['global_steps']} steps"
            )
        print(f"  final model: {previous}")
    shutdown_distributed()


def _reset_accelerate_state() -> None:
    """Let the next stage's Trainer build a fresh Accelerator (and DeepSpeed engine) in this process."""
    try:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
    except (ImportError, AttributeError):  # pragma: no cover - older accelerate
        pass


def cli() -> None:
    """`hive-train` and `python -m hive_adapter.training.train`: `main`, then a clean end for launched ranks. A refused
    argument, path or data set ends the command with its reason (exit status 2), not a traceback."""
    try:
        main()
    except (ValueError, OutputRefused, FileNotFoundError, TrainingDiverged) as error:
        print(f"[hive-train] error: {error}", file=sys.stderr, flush=True)
        shutdown_distributed()
        sys.exit(2)
    exit_if_launched()


if __name__ == "__main__":
    cli()
