"""Which layers HIVE joins, as numbers: the default share of encoder layers, layers spread evenly, a user's list
checked and made absolute, and the resolved pairing one (encoder, language model) pair ends up with. Shared by
`HiveConfig` and the connector registry (`connectors.py`), which decides the pairing; neither imports the other's
callers. `LayerRequest` is what a connector reads of a config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class LayerRequest(Protocol):
    """What a connector reads of a `HiveConfig`: the layers asked for and how levels map to depths."""

    vision_layers: list[int] | None
    llm_layers: list[int] | None
    level_mapping: str
    projector_type: str


# Share of vision layers HIVE selects when the user leaves `vision_layers` out (paper §8: 25%).
DEFAULT_LEVEL_FRACTION = 0.25


@dataclass(frozen=True)
class ResolvedLayers:
    """Absolute, validated layer indices for one (vision encoder, language model) pair.

    `level_of_block[k]` is the index into `vision_layers` that LLM depth `llm_layers[k]` attends to,
    or `None` when it attends to every level (`level_mapping="all"`).
    """

    vision_layers: tuple[int, ...]
    llm_layers: tuple[int, ...]
    level_of_block: tuple[int | None, ...]


def spread_layers(count: int, num_layers: int, *, end_at_last: bool) -> list[int]:
    """`count` indices spread evenly over `num_layers`, shallow to deep.

    Vision levels end at the last encoder layer (the deepest features are always used); LLM depths
    start at layer 0 so the shallowest level meets the shallowest decoder layer.
    """
    if end_at_last:
        return [round((i + 1) * num_layers / count) - 1 for i in range(count)]
    return [(i * num_layers) // count for i in range(count)]


def normalise_layers(indices: list[int], num_layers: int, name: str, what: str) -> list[int]:
    out = []
    for index in indices:
        if not -num_layers <= index < num_layers:
            raise ValueError(
                f"{name}={list(indices)}: index {index} is out of range, the {what} has {num_layers} layers"
            )
        out.append(index % num_layers)
    if len(set(out)) != len(out):
        raise ValueError(
            f"{name}={list(indices)}: the same layer is listed twice (after resolving negative indices: {out})"
        )
    if out != sorted(out):
        raise ValueError(f"{name}={list(indices)}: list layers shallow to deep (ascending), HIVE pairs them in order")
    return out
