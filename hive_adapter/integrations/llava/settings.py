"""The settings a LLaVA model's HIVE connector is rebuilt from, and where they are kept.

`config.hive_config` of a LLaVA model holds the HIVE knobs with the layer lists resolved and the vision
encoder's shape, so `LlavaLlamaForCausalLM.from_pretrained` and `load_pretrained_model` rebuild the modules
without the command line that trained them. The same settings travel inside `mm_projector.bin` as a buffer
(`hive_settings`), so a stage-1 adapter file says what it was trained with: LLaVA builds that file from the
parameters alone, and `add_projector_settings` adds the buffer of the model being saved.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

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


def encode_settings(settings: dict[str, Any]) -> torch.Tensor:
    data = json.dumps(settings, sort_keys=True).encode()
    return torch.tensor(list(data), dtype=torch.float32)  # (bytes,)


def decode_settings(tensor: torch.Tensor, *, source: str) -> dict[str, Any]:
    try:
        return json.loads(bytes(int(value) for value in tensor.round().tolist()).decode())
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{source}: its {SETTINGS_PARAMETER} do not decode ({error}); the file is damaged") from error


def add_projector_settings(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """`state` (LLaVA's adapter dict, the parameters of `model` named like `mm_projector`) with the HIVE connector's
    settings added next to its weights, under the name the buffer has in `model`, the model being saved (LLaVA's,
    or a PEFT model around it): `model.mm_projector.hive_settings`. Unchanged when `state` holds no HIVE weights.

    Checkouts patched before pass LLaVA's (name, parameter) pairs instead of the model: they name no model, so the
    file is saved without the settings (its config.json beside it has them), with a warning to re-apply the patch.
    """
    if not isinstance(model, nn.Module):
        warnings.warn(
            "add_projector_settings(state, named_parameters) is the call of a LLaVA checkout patched by an earlier "
            "hive-adapter: re-apply patches/llava/*.patch. This mm_projector.bin is saved without its HIVE settings "
            "(the config.json beside it has them)",
            FutureWarning,
            stacklevel=2,
        )
        return state
    suffix = f"mm_projector.{SETTINGS_PARAMETER}"
    for name, buffer in model.named_buffers():
        prefix = name[: -len(SETTINGS_PARAMETER)]
        if name.endswith(suffix) and any(key.startswith(prefix + "hive_") for key in state):
            state[name] = buffer.detach().float().cpu().clone()
    return state


def settings_in_adapter_file(path: str | Path) -> dict[str, Any] | None:
    """The HIVE settings saved inside an `mm_projector.bin`, or None (LLaVA's own connector, or hive-adapter 0.1)."""
    weights = torch.load(path, map_location="cpu", weights_only=True)
    for name, tensor in weights.items():
        if name.endswith(f"mm_projector.{SETTINGS_PARAMETER}"):
            return decode_settings(tensor, source=str(path))
    return None
