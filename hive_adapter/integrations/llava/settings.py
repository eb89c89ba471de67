"""The settings a LLaVA model's HIVE connector is rebuilt from, and where they are kept.

`config.hive_config` of a LLaVA model holds the HIVE knobs with the layer lists resolved and the vision
encoder's shape, so `LlavaLlamaForCausalLM.from_pretrained` and `load_pretrained_model` rebuild the modules
without the command line that trained them. The same settings travel inside `mm_projector.bin` as a buffer
(`hive_settings`), so a stage-1 adapter file says what it was trained with.
"""

from __future__ import annotations

import json
import weakref
from pathlib import Path
from typing import Any

import torch

from ...model.architectures import vision_shape_of
from ...model.config import HiveConfig

PROJECTOR_TYPE = "hive"  # config.mm_projector_type of a LLaVA model whose connector is HIVE
# LLaVA's --mm_vision_select_feature -> HiveConfig.vision_feature_select
FEATURE_SELECT = {"patch": "patch", "cls_patch": "full"}


def hive_llava_settings(hive_config: HiveConfig, vision_config, num_llm_layers: int) -> dict[str, Any]:
    """What `config.hive_config` of a LLaVA model holds: the HIVE knobs, with the layer lists resolved
    (a checkpoint never depends on this library's defaults), and the vision encoder's shape."""
    vision = vision_shape_of(vision_config)
    resolved = hive_config.resolve_layers(num_vision_layers=vision.num_layers, num_llm_layers=num_llm_layers)
    return {
        **hive_config.adapter_dict(),
        "vision_layers": list(resolved.vision_layers),
        "llm_layers": list(resolved.llm_layers),
        "vision_shape": {
            "num_layers": vision.num_layers,
            "hidden_size": vision.hidden_size,
            "patch_size": vision.patch_size,
            "image_size": vision.image_size,
        },
    }


# A buffer of the projector holding its settings (JSON bytes as floats, exact in fp16/bf16 too). It is in every
# state dict, and `add_projector_settings` puts it into `mm_projector.bin` (which LLaVA builds from the
# parameters alone), so the file carries the settings it was trained with.
SETTINGS_PARAMETER = "hive_settings"
LIVE_MODULES: weakref.WeakSet = weakref.WeakSet()


def encode_settings(settings: dict[str, Any]) -> torch.Tensor:
    data = json.dumps(settings, sort_keys=True).encode()
    return torch.tensor(list(data), dtype=torch.float32)  # (bytes,)


def decode_settings(tensor: torch.Tensor, *, source: str) -> dict[str, Any]:
    try:
        return json.loads(bytes(int(value) for value in tensor.round().tolist()).decode())
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{source}: its {SETTINGS_PARAMETER} do not decode ({error}); the file is damaged") from error


def add_projector_settings(state: dict[str, torch.Tensor], named_parameters: list) -> dict[str, torch.Tensor]:
    """`state` (LLaVA's adapter dict, built from `named_parameters`) with the HIVE projector's settings added
    next to its weights, when one of them is there."""
    for name, parameter in named_parameters:
        if "mm_projector.hive_" not in name or name not in state:
            continue
        owner = next((p for p in LIVE_MODULES if any(q is parameter for q in p.parameters())), None)
        if owner is not None:
            prefix = name[: name.index("mm_projector.") + len("mm_projector.")]
            state[prefix + SETTINGS_PARAMETER] = owner.hive_settings.detach().float().cpu().clone()
        break
    return state


def settings_in_adapter_file(path: str | Path) -> dict[str, Any] | None:
    """The HIVE settings saved inside an `mm_projector.bin`, or None (LLaVA's own connector, or hive-adapter 0.1)."""
    weights = torch.load(path, map_location="cpu", weights_only=True)
    for name, tensor in weights.items():
        if name.endswith(f"mm_projector.{SETTINGS_PARAMETER}"):
            return decode_settings(tensor, source=str(path))
    return None
