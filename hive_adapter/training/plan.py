"""What a hive-train run starts from, and what it refuses before training a single step.

A stage starts from the previous stage's output in `--output_dir` (stage 1 from `stage0`, the composed
model), or from `--model_name_or_path`; when the two disagree, or neither exists, the run stops and says so.
Flags that contradict the model a run starts from, or stages it would skip as finished, are errors naming
both values: silently training another model than the one asked for costs days of compute.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from transformers import AutoConfig

from ..model.config import HiveConfig
from ..model.connectors import connector_for
from ..utils.outputs import OutputRefused, check_target, owner_of, partial_path
from .hive_flags import HiveArguments, hive_config_from
from .stages import StageSpec

STAGE_REPORT = "hive_stage.json"

# --flag -> the HiveConfig field it sets (layer lists are compared after resolving defaults).
FLAG_FIELDS = {
    "vision_connector": "connector",
    "hive_level_mapping": "level_mapping",
    "hive_tokens_per_level": "tokens_per_level",
    "hive_projector_type": "projector_type",
    "hive_media_width": "media_width",
    "hive_use_ffn": "use_ffn",
    "hive_placement": "placement",
    "hive_initializer_range": "initializer_range",
}
LAYER_FLAGS = {"hive_vision_layers": "vision_layers", "hive_llm_layers": "llm_layers"}


def is_complete_stage(directory: Path) -> bool:
    return (directory / STAGE_REPORT).is_file() and (directory / "config.json").is_file()


def stage_report(directory: Path) -> dict[str, Any]:
    return json.loads((directory / STAGE_REPORT).read_text())


def starting_point(first: StageSpec, output_dir: Path, model_name_or_path: str | None) -> Path:
    """The model the first requested stage trains from (for stage 1 without `--model_name_or_path`:
    `output_dir/stage0`, composed if missing)."""
    given = Path(model_name_or_path) if model_name_or_path else None
    if first.number == 1:
        return given if given is not None else output_dir / "stage0"
    previous = output_dir / f"stage{first.number - 1}"
    if is_complete_stage(previous):
        if given is not None and given.resolve() != previous.resolve():
            raise ValueError(
                f"--stage {first.number}: this run's stage {first.number - 1} is finished in {previous}, and "
                f"--model_name_or_path {given} says to start from another model; drop --model_name_or_path to "
                f"continue this run, or pick another --output_dir to start stage {first.number} from {given}"
            )
        return previous
    if given is not None:
        return given
    raise ValueError(
        f"--stage {first.number} starts from stage {first.number - 1}'s model, and {previous} is "
        f"{'unfinished' if previous.exists() else 'missing'}; run --stage {first.number - 1} first (or --stage "
        f"{first.number - 1},{first.number}), or pass --model_name_or_path to say where stage {first.number} starts"
    )


def refuse_a_model_that_is_not_hive(start: Path) -> None:
    """`--model_name_or_path` is where a HIVE checkpoint goes; a VLM family's own saved model there (Qwen2.5-VL,
    SmolVLM, ...) is refused by its model type, naming the route that trains HIVE over its encoder."""
    model_type = json.loads((start / "config.json").read_text()).get("model_type")
    if model_type == "hive":
        return
    raise ValueError(
        f"--model_name_or_path {start} holds a {model_type} model, not a HIVE checkpoint: hive-train trains a HIVE "
        f"model composed from a vision encoder and a causal LM. To train HIVE over this model's own encoder, pass "
        f"--vision_model {start} and --language_model <a causal LM directory> instead; to keep this model's own "
        "language model, wrap it with hive_adapter.get_hive_model in your training loop (docs/guides/add-to-your-model.md)"
    )


def contradictions(config: HiveConfig, hive_args: HiveArguments, explicit: set[str]) -> list[str]:
    """Every explicitly given HIVE flag whose value differs from `config`'s, as `--flag asked (model: value)`."""
    asked = hive_config_from(hive_args)
    found = []
    for flag, field in FLAG_FIELDS.items():
        if flag in explicit and getattr(asked, field) != getattr(config, field):
            found.append(f"--{flag} {getattr(asked, field)!r} (the model: {field}={getattr(config, field)!r})")
    if explicit & set(LAYER_FLAGS) and config.vision_config is not None:
        counts = {
            "num_vision_layers": config.vision_config.num_hidden_layers,
            "num_llm_layers": config.text_config.num_hidden_layers,
        }
        # The asked layers as the model's connector places them (another connector is named above on its own).
        have = config.resolve_layers(**counts)
        try:
            want = connector_for(config.connector).resolve_layers(asked, **counts)
        except ValueError as error:  # flags the model's connector cannot place at all
            return [*found, f"the layer flags ({error})"]
        for flag, field in LAYER_FLAGS.items():
            if flag in explicit and getattr(want, field) != getattr(have, field):
                found.append(f"--{flag} {list(getattr(want, field))} (the model: {list(getattr(have, field))})")
    return found


def check_flags(config: HiveConfig, hive_args: HiveArguments, explicit: set[str], *, where: Path) -> None:
    """Refuse explicit flags that contradict the model at `where`."""
    found = contradictions(config, hive_args, explicit)
    if found:
        raise ValueError(
            f"{where} holds a HIVE model built with other settings than the command line asks for: "
            f"{'; '.join(found)}. Drop those flags to train that model, or use a new --output_dir for a new one."
        )


def check_sources(stage0: Path, vision_model: str | None, language_model: str | None) -> None:
    """An existing stage0 composed from other checkpoints than `--vision_model` / `--language_model` name."""
    recorded = stage_report(stage0)
    for flag, given in (("vision_model", vision_model), ("language_model", language_model)):
        before = recorded.get(flag)
        if given and before and Path(given).resolve() != Path(before).resolve():
            raise ValueError(
                f"{stage0} was composed from --{flag} {before}, the command line names {given}; use a new "
                "--output_dir to compose from other checkpoints"
            )


def plan_stages(
    stages: list[StageSpec], output_dir: Path, *, model_args, hive_args: HiveArguments, explicit: set[str], command: str
) -> tuple[Path, bool]:
    """(the model the run starts from, whether stage 0 must be composed first). Refuses, before anything
    trains, flags that contradict an existing model or finished stage, and stage directories in the way."""
    if model_args.model_name_or_path and (model_args.vision_model or model_args.language_model):
        raise ValueError(
            "pass either --model_name_or_path (a HIVE checkpoint to start from) or --vision_model and "
            "--language_model (to compose one), not both"
        )
    start = starting_point(stages[0], output_dir, model_args.model_name_or_path)
    compose = start == output_dir / "stage0" and not is_complete_stage(start)
    if compose:
        if not (model_args.vision_model and model_args.language_model):
            raise ValueError("pass --vision_model and --language_model, or --model_name_or_path of a HIVE checkpoint")
        check_target(start, command=command, replace=True)
    else:
        if not (start / "config.json").is_file():
            raise FileNotFoundError(f"{start}: no config.json, not a HIVE checkpoint directory")
        refuse_a_model_that_is_not_hive(start)
        check_flags(AutoConfig.from_pretrained(start), hive_args, explicit, where=start)
        if start == output_dir / "stage0":
            check_sources(start, model_args.vision_model, model_args.language_model)
    for stage in stages:
        final = output_dir / f"stage{stage.number}"
        if is_complete_stage(final):
            check_flags(AutoConfig.from_pretrained(final), hive_args, explicit, where=final)
            continue
        check_target(final, command=command, replace=True)  # absent, empty, or an unfinished output of ours
        partial = partial_path(final)
        if partial.exists() and owner_of(partial) != command:
            raise OutputRefused(f"{partial} is in the way of {final} and was not written by {command}; move it away")
    return start, compose


# Float settings of the optimiser that must be finite numbers (NaN passes every `<= 0` check and reaches the
# weights through the update).
FINITE_FLAGS = ("weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm")


def _finite_above_zero(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def validate_run_arguments(
    *, global_batch_size: int | None, training_args, explicit: set[str], deepspeed: str | None = None
) -> None:
    """Values the Trainer would turn into a silent no-op, a ZeroDivisionError or NaN weights, and contradicting
    back-ends, named before anything runs."""
    if training_args.fsdp and deepspeed is not None:
        raise ValueError(
            f"--fsdp with --deepspeed {Path(deepspeed).stem}: choose one (both shard the model, in different ways)"
        )
    for flag in FINITE_FLAGS:
        value = getattr(training_args, flag)
        if flag in explicit and not (isinstance(value, (int, float)) and math.isfinite(value)):
            raise ValueError(f"--{flag} {value}: must be a finite number")
    if global_batch_size is not None and global_batch_size < 1:
        raise ValueError(f"--global_batch_size {global_batch_size}: must be a positive number of samples")
    if training_args.per_device_train_batch_size < 1:
        raise ValueError(f"--per_device_train_batch_size {training_args.per_device_train_batch_size}: must be >= 1")
    if "gradient_accumulation_steps" in explicit and training_args.gradient_accumulation_steps < 1:
        raise ValueError(f"--gradient_accumulation_steps {training_args.gradient_accumulation_steps}: must be >= 1")
    if "learning_rate" in explicit and not _finite_above_zero(training_args.learning_rate):
        raise ValueError(
            f"--learning_rate {training_args.learning_rate}: must be a finite number above 0 (0 trains nothing)"
        )
    if "max_steps" in explicit and training_args.max_steps == 0:
        raise ValueError("--max_steps 0 trains nothing; give a positive number, or leave it out to train by epochs")
    if "num_train_epochs" in explicit and training_args.max_steps <= 0 and not training_args.num_train_epochs > 0:
        raise ValueError(f"--num_train_epochs {training_args.num_train_epochs}: must be above 0 (0 trains nothing)")
    limit = training_args.save_total_limit
    if limit is not None and limit < 1:
        raise ValueError(f"--save_total_limit {limit}: keep at least 1 checkpoint (or leave it out to keep all)")


def validate_vision_learning_rate(rate: float | None, stages: list[StageSpec]) -> None:
    """`--vision_learning_rate` is the encoder's own peak in the stage that trains it (3); refused elsewhere."""
    if rate is None:
        return
    if not _finite_above_zero(rate):
        raise ValueError(f"--vision_learning_rate {rate}: must be a finite number above 0")
    if not any("vision" in stage.trains for stage in stages):
        numbers = ",".join(str(stage.number) for stage in stages)
        raise ValueError(
            f"--vision_learning_rate {rate:g} applies to stage 3 (the only stage that trains the vision encoder); "
            f"--stage {numbers} keeps the encoder frozen. Drop the flag, or add stage 3"
        )


def validate_hive_learning_rate(rate: float | None, stages: list[StageSpec]) -> None:
    """`--hive_learning_rate` is HIVE's own peak in the stages that also train the LLM; given for a run of
    stage 1 alone it would change nothing."""
    if rate is None:
        return
    if not _finite_above_zero(rate):
        raise ValueError(f"--hive_learning_rate {rate}: must be a finite number above 0")
    if all(set(stage.trains) == {"hive"} for stage in stages):
        numbers = ",".join(str(stage.number) for stage in stages)
        raise ValueError(
            f"--hive_learning_rate {rate:g} applies to stages 2 and 3 (they train the LLM too); --stage {numbers} "
            "trains HIVE's modules alone, at --learning_rate (Table 3: 1e-3). Drop the flag, or give --learning_rate"
        )


def looks_like_a_path(value: str) -> bool:
    """A local path rather than a hub id (`org/name`): absolute, relative (`./`, `../`, `~`), or deeper."""
    return value.startswith(("/", ".", "~")) or value.count("/") > 1 or "\\" in value


def validate_model_paths(model_args) -> None:
    """Model directories that do not exist, named by their flag before anything is created (transformers would
    take a missing local directory for a hub id and fail about a repo id)."""
    for flag in ("vision_model", "language_model", "model_name_or_path", "tokenizer", "image_processor"):
        value = getattr(model_args, flag, None)
        if not value:
            continue
        path = Path(value).expanduser()
        if path.exists() and not path.is_dir():
            raise FileNotFoundError(f"--{flag} {value}: a file; give the model's directory (with its config.json)")
        if not path.exists() and looks_like_a_path(value):
            raise FileNotFoundError(f"--{flag} {value}: no such directory")
