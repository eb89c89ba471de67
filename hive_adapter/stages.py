"""The three pre-training stages of HIVE as data (supplementary Table 3).

Stage 1 trains the new HIVE modules only (projectors, cross-attention, gates); stage 2 adds the
language model; stage 3 trains everything including the vision encoder. Each stage's optimiser
(fully decoupled AdamW, weight decay 0), cosine schedule to a minimum LR, clipping, global batch and
epochs are the paper's; warmup is kept as the paper's *fraction* of the stage so it scales with the
user's dataset. Explicit command-line flags override any of it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from torch import nn

from .connector import HIVE_PREFIX

logger = logging.getLogger(__name__)

# What each part of a HiveForConditionalGeneration is called, by parameter-name prefix.
PART_PREFIXES = {
    "vision": ("vision_model.",),
    "llm": ("language_model.",),
}


@dataclass(frozen=True)
class StageSpec:
    """One row of Table 3."""

    number: int
    name: str
    trains: tuple[str, ...]  # parts: "hive", "llm", "vision"
    peak_lr: float
    min_lr: float
    betas: tuple[float, float]
    weight_decay: float
    global_batch_size: int
    epochs: float
    max_grad_norm: float
    paper_warmup_iters: int
    paper_total_iters: int

    @property
    def warmup_ratio(self) -> float:
        return self.paper_warmup_iters / self.paper_total_iters

    def warmup_steps(self, total_steps: int) -> int:
        """The paper's warmup share of this stage, applied to a run of `total_steps` optimiser steps."""
        return max(1, math.ceil(self.warmup_ratio * total_steps)) if total_steps > 1 else 0


STAGES: dict[int, StageSpec] = {
    1: StageSpec(1, "projector", ("hive",), 1e-3, 1e-4, (0.9, 0.999), 0.0, 256, 1, 1.0, 70, 2326),
    2: StageSpec(2, "projector+llm", ("hive", "llm"), 2e-5, 2e-6, (0.9, 0.95), 0.0, 256, 2, 10.0, 140, 4652),
    3: StageSpec(3, "full", ("hive", "llm", "vision"), 2e-6, 0.0, (0.9, 0.95), 0.0, 1024, 1, 10.0, 18, 581),
}


def parse_stages(value: str) -> list[StageSpec]:
    """`"1"`, `"2"`, `"3"`, `"all"` (1 -> 2 -> 3) or a list such as `"2,3"`."""
    if value == "all":
        return [STAGES[1], STAGES[2], STAGES[3]]
    try:
        numbers = [int(part) for part in value.split(",")]
    except ValueError:
        numbers = []
    if not numbers or any(n not in STAGES for n in numbers) or numbers != sorted(set(numbers)):
        raise ValueError(f"--stage {value!r}: expected 1, 2, 3, all, or an ascending list such as 2,3")
    return [STAGES[n] for n in numbers]


def part_of(name: str) -> str:
    if HIVE_PREFIX in name:
        return "hive"
    for part, prefixes in PART_PREFIXES.items():
        if name.startswith(prefixes):
            return part
    return "other"


def apply_stage(model: nn.Module, stage: StageSpec) -> dict[str, tuple[int, int]]:
    """Set `requires_grad` for `stage`; return {part: (trainable, total)} parameter counts (ZeRO-3 aware)."""
    counts: dict[str, list[int]] = {}
    for name, param in model.named_parameters():
        part = part_of(name)
        trains = part in stage.trains
        param.requires_grad_(trains)
        numel = getattr(param, "ds_numel", 0) or param.numel()
        bucket = counts.setdefault(part, [0, 0])
        bucket[1] += numel
        if trains:
            bucket[0] += numel
    result = {part: (trainable, total) for part, (trainable, total) in counts.items()}
    trainable = sum(t for t, _ in result.values())
    total = sum(n for _, n in result.values())
    logger.info(
        "stage %d (%s): %s trainable of %s parameters (%s)",
        stage.number,
        stage.name,
        f"{trainable:,}",
        f"{total:,}",
        ", ".join(f"{part} {t:,}/{n:,}" for part, (t, n) in sorted(result.items())),
    )
    return result
