"""`HiveTrainer`: the HF `Trainer` as hive-train runs it.

- checkpoints are marked complete before any older one is deleted (`hive_adapter.training.checkpoints`), so a kill at
  any moment leaves a checkpoint a resume can trust;
- with `hive_learning_rate`, HIVE's parameters get their own optimiser groups at that peak: the Trainer's
  scheduler scales every group's own initial rate, so HIVE's modules follow the stage's warmup and cosine at a
  different height (LLaVA's `--mm_projector_lr` does the same for its connector); `vision_learning_rate` does
  the same for the vision encoder's parameters (stage 3);
- FSDP runs on CPU ranks too (gloo: how the tests run it), and the stage's model is saved whole;
- without a terminal, `StepLines` prints one short line per logging step (at most one per `every_seconds`)
  where the Trainer would redraw a progress bar or print a dict;
- a step whose loss or gradient norm is NaN or inf stops the stage before its optimiser step, on every rank
  together (`TrainingDiverged`, naming the step): the Trainer would otherwise log the average of earlier
  losses in its place, clip with a NaN norm, and write NaN into every weight it trains.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path

import torch
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from transformers import Trainer, TrainerCallback

from ..utils.console import say
from ..utils.distributed import any_rank, barrier, is_main_process, world_size
from . import checkpoints  # called through the module: fault-injection tests replace its functions
from .cli_arguments import COMMAND
from .stages import part_of

logger = logging.getLogger(__name__)


def enable_fsdp_on_cpu_ranks(trainer: Trainer) -> None:
    """accelerate turns FSDP on for accelerators only; on CPU ranks (gloo: how the tests run it) it is turned on
    here, after the Trainer built its accelerator: FSDP2's `fully_shard` runs on CPU. On GPUs nothing changes."""
    state = trainer.accelerator.state
    if getattr(trainer.args, "fsdp_plugin_args", None) is None or state.distributed_type != DistributedType.MULTI_CPU:
        return
    state.fsdp_plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # AcceleratorState() copies it back
    trainer.is_fsdp_enabled = True


class StepLines(TrainerCallback):
    """`[hive-train] stage 2 step 50/125 loss 2.9012 lr 1.6e-05 (21 s)` at a logging step, at most one line per
    `every_seconds` (the stage's last logged step always), and how long the stage took: a log file's view of
    training."""

    def __init__(self, label: str, *, every_seconds: float = 10.0):
        self.label, self.every_seconds = label, every_seconds
        self.started = self.last = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.monotonic()
        self.last = self.started - self.every_seconds  # the first logging step prints

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs, now = logs or {}, time.monotonic()
        if "train_runtime" in logs:
            say(COMMAND, f"{self.label}: {state.global_step} steps in {logs['train_runtime']:.0f} s")
        elif "loss" in logs and (now - self.last >= self.every_seconds or 0 < state.max_steps <= state.global_step):
            self.last = now
            rate = f" lr {logs['learning_rate']:.1e}" if "learning_rate" in logs else ""
            say(
                COMMAND,
                f"{self.label} step {state.global_step}/{state.max_steps} loss {logs['loss']:.4f}{rate} "
                f"({now - self.started:.0f} s)",
            )


class TrainingDiverged(RuntimeError):
    """A stage whose loss, gradients or weights went NaN or inf: stopped, and never installed."""


def _finite(value) -> bool:
    return value is None or math.isfinite(float(value))


class HiveTrainer(Trainer):
    """See the module docstring. `keep_checkpoints` replaces `args.save_total_limit`, which must be None here (the
    Trainer's own rotation deletes before anything is marked); `hive_learning_rate`: HIVE's own peak, or None
    (every parameter at the stage's)."""

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        enable_fsdp_on_cpu_ranks(self)

    def save_whole_model(self, directory: Path) -> None:
        """The model, whole, in `directory`: ZeRO-3 partitions gathered by the Trainer; FSDP shards gathered here
        (a full state dict on rank 0, whatever the checkpoints' `state_dict_type`)."""
        if not self.is_fsdp_enabled:
            self.save_model(str(directory))
            return
        state_dict = self.accelerator.get_state_dict(self.model)
        if self.is_world_process_zero():
            model = self.accelerator.unwrap_model(self.model)
            model.save_pretrained(directory, state_dict=state_dict)
            # FSDP2 swaps the model's class for `FSDP<name>`; the checkpoint names the model's own class.
            config = json.loads((directory / "config.json").read_text())
            config["architectures"] = [
                cls.__name__ for cls in type(model).__mro__ if not cls.__name__.startswith("FSDP")
            ][:1]
            (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    def __init__(
        self,
        *args,
        keep_checkpoints: int | None = None,
        hive_learning_rate: float | None = None,
        vision_learning_rate: float | None = None,
        label: str = "training",
        run_settings: dict | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if self.args.save_total_limit is not None:
            raise ValueError("pass the checkpoint limit as keep_checkpoints; args.save_total_limit must be None")
        self.keep_checkpoints = keep_checkpoints
        self.hive_learning_rate = hive_learning_rate
        self.vision_learning_rate = vision_learning_rate
        self.label = label  # "stage 2": how errors name what diverged
        self.run_settings = run_settings  # what a step means, written into every checkpoint (checkpoints.RUN_SETTINGS)
        self._non_finite_loss: float | None = None  # the first non-finite loss of the current optimiser step

    # ------------------------------------------------------------------ divergence
    def training_step(self, model, inputs, *args, **kwargs):
        loss = super().training_step(model, inputs, *args, **kwargs)
        if self._non_finite_loss is None and not _finite(loss.detach()):
            self._non_finite_loss = float(loss.detach())
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        """The Trainer's gradient norm, read before the optimiser step: where a non-finite loss or norm stops the
        stage (every rank votes, so all of them raise at the same step)."""
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        loss, self._non_finite_loss = self._non_finite_loss, None
        if any_rank(loss is not None or not _finite(grad_norm)):
            self.diverged(loss=loss, grad_norm=grad_norm)
        return grad_norm

    def newest_checkpoint_note(self) -> str:
        """Where a diverged stage can resume from: the newest checkpoint complete now, or that there is none."""
        choice = checkpoints.choose_resume_checkpoint(Path(self.args.output_dir))
        if choice.checkpoint is None:
            return f"no complete checkpoint in {self.args.output_dir}"
        return f"the newest complete checkpoint is {choice.checkpoint}"

    def diverged(self, *, loss: float | None, grad_norm) -> None:
        step = self.state.global_step + 1
        what = ", ".join(
            part
            for part in (
                f"loss {loss}" if loss is not None else "",
                f"gradient norm {float(grad_norm)}" if grad_norm is not None and not _finite(grad_norm) else "",
            )
            if part
        )
        rates = sorted({f"{group['lr']:g}" for group in self.optimizer.param_groups}) if self.optimizer else []
        kept = self.newest_checkpoint_note()
        raise TrainingDiverged(
            f"{self.label} diverged at step {step} of {self.state.max_steps}: "
            f"{what or 'on another rank'} (learning rate {', '.join(rates) or '?'}). Nothing from this step on is "
            f"saved and the stage is not installed; {kept}. Find the cause (a lower --learning_rate or "
            "--hive_learning_rate, --max_grad_norm, fp32 instead of fp16, the batch's data), then rerun with "
            "--resume_from_checkpoint auto."
        )

    def create_optimizer(self, model=None):
        own_rates = {"hive": self.hive_learning_rate, "vision": self.vision_learning_rate}
        if all(rate is None for rate in own_rates.values()) or self.optimizer is not None:
            return super().create_optimizer(model)
        model = self.model if model is None else model
        decayed = set(self.get_decay_parameter_names(model))
        groups: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
        for name, param in model.named_parameters():
            if param.requires_grad:
                groups.setdefault((part_of(name), name in decayed), []).append(param)  # hive / vision / llm / ...
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        self.optimizer = optimizer_cls(
            [
                {
                    "params": params,
                    "weight_decay": self.args.weight_decay if decays else 0.0,
                    **({"lr": own_rates[part]} if own_rates.get(part) is not None else {}),
                }
                for (part, decays), params in groups.items()
            ],
            **optimizer_kwargs,
        )
        return self.optimizer

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = Path(self._get_output_dir(trial=trial))
        folder = run_dir / f"checkpoint-{self.state.global_step}"
        if is_main_process() and folder.exists() and checkpoints.why_incomplete(folder) is not None:
            logger.info("removing %s, a torn save of an interrupted run", folder)
            shutil.rmtree(folder)
        barrier()
        super()._save_checkpoint(model, trial)
        barrier()  # every rank's part is on disk
        if is_main_process():
            if self.run_settings is not None:
                checkpoints.write_run_settings(folder, self.run_settings)
            missing = checkpoints.missing_for_resume(folder, world_size())
            if missing:
                logger.warning("%s cannot resume a run (it lacks %s); not marked complete", folder, "; ".join(missing))
            else:
                checkpoints.mark_complete(folder, self.state.global_step)
                checkpoints.rotate(run_dir, self.keep_checkpoints)
        barrier()
