"""Which parameters are HIVE's, and how many there are: the one place that decides both.

Every tensor HIVE adds carries `hive_` in its name (`hive_levels.*`, `hive_blocks.*`, `hive_q_proj`, gates and
norms), so freezing, saving, counting and LoRA exclusion all filter on `is_hive_parameter`. Counts read
`ds_numel` where DeepSpeed ZeRO-3 has partitioned a parameter to an empty shell.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

HIVE_PREFIX = "hive_"


def is_hive_parameter(name: str) -> bool:
    """Whether a parameter (or buffer) name belongs to HIVE's modules.

    Args:
        name (`str`): a name from `named_parameters()` / `state_dict()`, at any wrapper depth
            (`base_model.model.hive_blocks.3.hive_q_proj.weight` under PEFT).

    Returns:
        `bool`: True for HIVE's tensors (`hive_levels.*`, `hive_blocks.*`), False for the base model's.
    """
    return HIVE_PREFIX in name


def numel(param: torch.Tensor) -> int:
    """Elements of a parameter, ZeRO-3 partitions included."""
    return getattr(param, "ds_numel", 0) or param.numel()


def count_parameters(named: Iterable[tuple[str, torch.Tensor]]) -> tuple[int, int]:
    """(trainable, total) elements of `named` parameters, ZeRO-3 aware."""
    trainable = total = 0
    for _, param in named:
        total += numel(param)
        trainable += numel(param) if param.requires_grad else 0
    return trainable, total


def mark_hive_trainable(model: nn.Module, requires_grad: bool = True) -> int:
    """Set `requires_grad` on every HIVE parameter of `model` (any wrapper around it, e.g. a PeftModel, which
    freezes everything but LoRA).

    Args:
        model (`nn.Module`): a HIVE model, or any wrapper around one.
        requires_grad (`bool`, defaults to `True`): the flag to set.

    Returns:
        `int`: how many parameters were set.
    """
    count = 0
    for name, param in model.named_parameters():
        if is_hive_parameter(name):
            param.requires_grad_(requires_grad)
            count += 1
    return count


def non_finite_names(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the floating-point tensors of `named_tensors` that hold NaN or inf."""
    return [name for name, tensor in named_tensors if tensor.is_floating_point() and not torch.isfinite(tensor).all()]


def check_finite(named_tensors: Iterable[tuple[str, torch.Tensor]], *, source: str) -> None:
    """Refuse weights holding NaN or inf (a damaged file), naming them."""
    bad = non_finite_names(named_tensors)
    if bad:
        raise ValueError(
            f"HIVE weights in {source} hold NaN or inf: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''} "
            f"({len(bad)} tensors). The file is damaged; load an intact copy."
        )


def non_finite_tensors_in(directory: str | Path) -> list[str]:
    """Names of the floating-point tensors holding NaN or inf in a saved model's safetensors files (one file or
    shards), read back as written: what a stage is checked with before it is installed."""
    from safetensors import safe_open

    bad = []
    for path in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as weights:
            bad += non_finite_names((name, weights.get_tensor(name)) for name in weights.keys())
    return bad
