"""`python -m hive_adapter.integrations.llava.train`: LLaVA's `llava/train/train.py`, HIVE-enabled.

Takes every flag LLaVA's training script takes, plus `--vision_connector hive` and the `--hive_*`
options (`--hive_vision_layers 5,11,17,23`, `--hive_llm_layers`, `--hive_tokens_per_level`,
`--hive_level_mapping`, ...) and `--unfreeze_vision_tower` for stage 3. Runs on CPU and GPU with the
model's default attention; `train_mem` is the flash-attention twin, as in LLaVA.

On transformers 5.x, the two `TrainingArguments` flags LLaVA's scripts use that 5.x renamed are
translated (`--evaluation_strategy` -> `--eval_strategy`, `--warmup_ratio` -> `--warmup_steps`, which
takes a ratio below 1), so the scripts run unchanged.
"""

from __future__ import annotations

import logging
import sys

# transformers 5.x renamed these TrainingArguments flags; LLaVA's scripts still pass the old names.
RENAMED_FLAGS = {"--evaluation_strategy": "--eval_strategy", "--warmup_ratio": "--warmup_steps"}


def translate_renamed_flags(argv: list[str]) -> list[str]:
    """Old TrainingArguments flag names -> the names of the installed transformers (no-op on 4.x)."""
    import dataclasses

    import transformers

    fields = {field.name for field in dataclasses.fields(transformers.TrainingArguments)}
    out = []
    for arg in argv:
        name, sep, value = arg.partition("=")
        new = RENAMED_FLAGS.get(name)
        if new is not None and name[2:] not in fields and new[2:] in fields:
            print(f"[hive-llava] {name} is {new} in transformers {transformers.__version__}; passing it as such")
            arg = new + sep + value
        out.append(arg)
    return out


def refuse_abbreviated_flags(argv: list[str]) -> None:
    """LLaVA's `HfArgumentParser` accepts abbreviations (`--deeps` for `--deepspeed`), which the `--deepspeed`
    check below would not see: an abbreviated flag ends the command (status 2) naming the full one."""
    import llava.train.train as llava_train
    from transformers import HfArgumentParser

    from hive_adapter.utils.flags import abbreviation_error

    parser = HfArgumentParser(
        (llava_train.ModelArguments, llava_train.DataArguments, llava_train.TrainingArguments), allow_abbrev=False
    )
    message = abbreviation_error(parser, argv)
    if message is not None:
        print(f"[hive-llava] error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)


def init_cpu_distributed() -> None:
    """Without CUDA, DeepSpeed needs the gloo backend up before LLaVA's `from_pretrained` (ZeRO-3 builds the
    model partitioned); on GPUs the Trainer starts NCCL itself."""
    import torch

    if torch.cuda.is_available() or (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")


def main(attn_implementation: str | None = None) -> None:
    from hive_adapter.integrations.llava.patch import apply_patch
    from hive_adapter.utils.console import quiet_progress_bars

    quiet_progress_bars()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    apply_patch()
    sys.argv = [sys.argv[0], *translate_renamed_flags(sys.argv[1:])]
    refuse_abbreviated_flags(sys.argv[1:])
    if any(arg.split("=")[0] == "--deepspeed" for arg in sys.argv):
        init_cpu_distributed()
    from llava.train.train import train

    train(attn_implementation=attn_implementation)

    from hive_adapter.utils.distributed import shutdown_distributed

    shutdown_distributed()


def cli(attn_implementation: str | None = None) -> None:
    """`hive-llava-train`, `python -m hive_adapter.integrations.llava.train`, `train_mem.py`: `main`, then a
    clean end for launched ranks (`hive_adapter.utils.distributed.exit_if_launched`)."""
    main(attn_implementation)
    from hive_adapter.utils.distributed import exit_if_launched

    exit_if_launched()


if __name__ == "__main__":
    cli()
