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

import logging
import sys
from functools import partial
from pathlib import Path

from ..data.synthetic import checked_attributes
from ..utils.console import quiet_progress_bars
from ..utils.console import say as console_say
from ..utils.distributed import barrier, exit_if_launched, init_distributed, is_main_process, shutdown_distributed
from ..utils.outputs import OutputRefused
from .cli_arguments import COMMAND, parse_arguments
from .hive_flags import hive_config_from
from .plan import (
    is_complete_stage,
    plan_stages,
    stage_report,
    validate_hive_learning_rate,
    validate_model_paths,
    validate_run_arguments,
    validate_vision_learning_rate,
)
from .stage_inputs import build_dataset, check_supervision, compose_stage0, encoder_image_size
from .stage_run import run_stage
from .stages import SFT, parse_stages
from .trainer import TrainingDiverged

logger = logging.getLogger("hive_adapter.training.train")

say = partial(console_say, COMMAND)


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
    dataset = build_dataset(data_args, image_size=encoder_image_size(source), instruct=instruct)
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
