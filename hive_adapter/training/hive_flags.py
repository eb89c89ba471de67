"""Command-line knobs of a HIVE adapter, shared by `hive-train` and the LLaVA integration.

Both parse them with `transformers.HfArgumentParser`; `hive_config_from` turns them into a validated
`HiveConfig` (layer lists are comma-separated, e.g. `--hive_vision_layers 5,11,17,23`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..model.config import HiveConfig


@dataclass
class HiveArguments:
    vision_connector: str = field(
        default="hive",
        metadata={
            "help": "hive | cascaded | concat (LLaVA-style self-attention baseline) | deepstack (Qwen3-VL's): "
            "rerun the paper's comparison."
        },
    )
    hive_vision_layers: str | None = field(
        default=None,
        metadata={"help": "Comma-separated encoder layers, e.g. 1,3,5,7 (default: ~25%%, shallow to deep)."},
    )
    hive_llm_layers: str | None = field(
        default=None, metadata={"help": "Comma-separated decoder layers, e.g. 0,2,4,6."}
    )
    hive_level_mapping: str = field(default="paired", metadata={"help": "paired | all."})
    hive_tokens_per_level: int | None = field(default=None, metadata={"help": "Pool each level to N tokens (square)."})
    hive_projector_type: str = field(
        default="mlp2x_gelu", metadata={"help": "linear | mlp2x_gelu (the paper's) | lean (to the narrow K/V input)."}
    )
    hive_media_width: int | None = field(
        default=None, metadata={"help": "With --hive_projector_type lean: the projected width (default 2x K/V)."}
    )
    hive_use_ffn: bool = field(default=False, metadata={"help": "Add a gated FFN after each cross-attention."})
    hive_placement: str = field(default="before", metadata={"help": "before | after the wrapped decoder layer."})
    hive_initializer_range: float | None = field(
        default=None,
        metadata={
            "help": "Std of HIVE's new weights at composition (default: HiveConfig's, 1/sqrt(fan_in) per layer)."
        },
    )


def parse_layer_list(value: str | None, name: str) -> list[int] | None:
    """`"1,3,5"` -> `[1, 3, 5]`; None stays None (HIVE's default spread)."""
    if value is None:
        return None
    try:
        return [int(part) for part in str(value).replace(" ", ",").split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--{name} {value!r}: expected comma-separated integers such as 1,3,5,7") from None


def hive_config_from(hive_args: HiveArguments, **overrides) -> HiveConfig:
    """A `HiveConfig` from parsed arguments; `overrides` set fields the command line does not carry."""
    settings = {
        "connector": hive_args.vision_connector,
        "vision_layers": parse_layer_list(hive_args.hive_vision_layers, "hive_vision_layers"),
        "llm_layers": parse_layer_list(hive_args.hive_llm_layers, "hive_llm_layers"),
        "level_mapping": hive_args.hive_level_mapping,
        "tokens_per_level": hive_args.hive_tokens_per_level,
        "projector_type": hive_args.hive_projector_type,
        "media_width": hive_args.hive_media_width,
        "use_ffn": hive_args.hive_use_ffn,
        "placement": hive_args.hive_placement,
    }
    if hive_args.hive_initializer_range is not None:
        settings["initializer_range"] = hive_args.hive_initializer_range
    settings.update(overrides)
    return HiveConfig(**settings)
