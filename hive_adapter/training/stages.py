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

from ..model.parameters import count_parameters, is_hive_parameter

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
    1: StageSpec(
        number=1,
        name="projector",
        trains=("hive",),
        peak_lr=1e-3,
        min_lr=1e-4,
        betas=(0.9, 0.999),
        weight_decay=0.0,
        global_batch_size=256,
        epochs=1,
        max_grad_norm=1.0,
        paper_warmup_iters=70,
        paper_total_iters=2326,
    ),
    2: StageSpec(
        number=2,
        name="projector+llm",
        trains=("hive", "llm"),
        peak_lr=2e-5,
        min_lr=2e-6,
        betas=(0.9, 0.95),
        weight_decay=0.0,
        global_batch_size=256,
        epochs=2,
        max_grad_norm=10.0,
        paper_warmup_iters=140,
        paper_total_iters=4652,
    ),
    3: StageSpec(
        number=3,
        name="full",
        trains=("hive", "llm", "vision"),
        peak_lr=2e-6,
        min_lr=0.0,
        betas=(0.9, 0.95),
        weight_decay=0.0,
        global_batch_size=1024,
        epochs=1,
        max_grad_norm=10.0,
        paper_warmup_iters=18,
        paper_total_iters=581,
    ),
    # Visual instruction tuning after the three pre-training stages (`--stage sft`). Table 3 has no row for it:
    # these are LLaVA-1.5's fine-tuning settings (its finetune.sh): the connector and the LLM train, the vision
    # encoder is frozen; lr 2e-5 with 3% warmup and a cosine to 0, AdamW's default betas, no weight decay, global
    # batch 128, one epoch, clipping at 1.0 (the Trainer's default, which LLaVA keeps).
    4: StageSpec(
        number=4,
        name="instruct",
        trains=("hive", "llm"),
        peak_lr=2e-5,
        min_lr=0.0,
        betas=(0.9, 0.999),
        weight_decay=0.0,
        global_batch_size=128,
        epochs=1,
        max_grad_norm=1.0,
        paper_warmup_iters=3,
        paper_total_iters=100,
    ),
}
SFT = STAGES[4]


def parse_stages(value: str) -> list[StageSpec]:
    """`"1"`, `"2"`, `"3"`, `"all"` (1 -> 2 -> 3), a list such as `"2,3"`, or `"sft"` (`"4"`): instruction tuning,
    from a finished stage 3, on instruction data (alone: pre-training and instruction data differ)."""
    if value == "all":
        return [STAGES[1], STAGES[2], STAGES[3]]
    try:
        numbers = [SFT.number if part.strip() == "sft" else int(part) for part in value.split(",")]
    except ValueError:
        numbers = []
    if not numbers or any(n not in STAGES for n in numbers) or numbers != sorted(set(numbers)):
        raise ValueError(f"--stage {value!r}: expected 1, 2, 3, all, an ascending list such as 2,3, or sft")
    if SFT.number in numbers and len(numbers) > 1:
        raise ValueError(
            f"--stage {value!r}: sft trains on instruction data, the other stages on captions; run the pre-training "
            "stages first, then hive-train --stage sft with the instruction data and the same --output_dir"
        )
    return [STAGES[n] for n in numbers]


def part_of(name: str) -> str:
    if is_hive_parameter(name):
        return "hive"
    for part, prefixes in PART_PREFIXES.items():
        if name.startswith(prefixes):
            return part
    return "other"


def apply_stage(model: nn.Module, stage: StageSpec) -> dict[str, tuple[int, int]]:
    """Set `requires_grad` for `stage`; return {part: (trainable, total)} parameter counts (ZeRO-3 aware)."""
    by_part: dict[str, list[tuple[str, nn.Parameter]]] = {}
    for name, param in model.named_parameters():
        part = part_of(name)
        param.requires_grad_(part in stage.trains)
        by_part.setdefault(part, []).append((name, param))
    result = {part: count_parameters(named) for part, named in by_part.items()}
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
