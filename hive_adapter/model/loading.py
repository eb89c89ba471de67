"""Load a trained HIVE model for inference, with the tokenizer and image processor it was trained with.

Two kinds of checkpoint, one call:

    loaded = load_hive("run/stage3")                               # HiveForConditionalGeneration directory
    loaded = load_hive("llava-hf/llava-1.5-7b-hf", adapter="adapter/")  # PEFT-style adapter on its base

Used by the analysis tools (`hive-analyze`) and the lmms-eval model; LLaVA-repo checkpoints go through
`hive_adapter.integrations.llava` instead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from .adapter_model import ADAPTER_CONFIG_NAME, HiveModel

logger = logging.getLogger(__name__)

_DTYPE_ARGUMENT = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"


@dataclass
class LoadedHive:
    """A HIVE model in eval mode and what turns an (image, text) pair into its inputs."""

    model: nn.Module
    tokenizer: Any
    image_processor: Any
    image_token: str | None  # the marker to put where the image goes (None: captioning, one image per sample)

    @property
    def connector(self) -> str:
        return self.model.hive_config.connector


def _dtype_of(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": None}
    if name not in dtypes:
        raise ValueError(f"dtype={name!r}: expected one of {sorted(dtypes)}")
    return dtypes[name]


def load_hive(
    pretrained: str | Path,
    *,
    adapter: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
) -> LoadedHive:
    """Load `pretrained` (a HIVE checkpoint, or with `adapter` the base model the adapter was trained on)."""
    from transformers import AutoImageProcessor, AutoTokenizer

    pretrained = Path(pretrained) if Path(pretrained).exists() else pretrained
    # transformers 5 renamed `torch_dtype` to `dtype`
    dtype_kwargs = {} if _dtype_of(dtype) is None else {_DTYPE_ARGUMENT: _dtype_of(dtype)}
    if adapter is None:
        from .modeling_hive import HiveForConditionalGeneration

        if isinstance(pretrained, Path) and (pretrained / ADAPTER_CONFIG_NAME).is_file():
            raise ValueError(
                f"{pretrained} is a HIVE adapter (it holds {ADAPTER_CONFIG_NAME}); pass the base model it was trained "
                "on as `pretrained` and this directory as `adapter`"
            )
        model = HiveForConditionalGeneration.from_pretrained(pretrained, **dtype_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(pretrained)
        image_processor = AutoImageProcessor.from_pretrained(pretrained)
        image_token = None
        if model.hive_image_token_id is not None:
            image_token = tokenizer.convert_ids_to_tokens(model.hive_image_token_id)
    else:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        base = AutoModelForImageTextToText.from_pretrained(pretrained, **dtype_kwargs)
        model = HiveModel.from_pretrained(base, adapter)
        processor = AutoProcessor.from_pretrained(pretrained)
        tokenizer, image_processor = processor.tokenizer, processor.image_processor
        image_token = getattr(processor, "image_token", None) or "<image>"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device).eval()
    logger.info(
        "loaded HIVE model (%s connector) from %s%s",
        model.hive_config.connector,
        pretrained,
        f" + adapter {adapter}" if adapter else "",
    )
    return LoadedHive(model=model, tokenizer=tokenizer, image_processor=image_processor, image_token=image_token)


def load_vision_encoder(path: str | Path):
    """A vision encoder from a vision-only checkpoint, the vision half of a CLIP/SigLIP checkpoint, or a saved
    vision-language model (Qwen2.5-VL, SmolVLM, LLaVA, ...): then its own encoder, `get_encoder(modality="image")`,
    with its weights. A checkpoint that leaves some of the encoder's weights unloaded is refused, naming them."""
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(path)
    vision_config = getattr(config, "vision_config", None)
    if vision_config is None:
        encoder, info = AutoModel.from_pretrained(path, output_loading_info=True)
    elif type(config) in AutoModelForImageTextToText._model_mapping:
        # A whole VLM: its encoder class would find none of its keys (they sit under the VLM's own prefixes) and
        # start from random weights; load the VLM and keep the encoder it says is its image encoder.
        vlm, info = AutoModelForImageTextToText.from_pretrained(path, output_loading_info=True)
        encoder = vlm.get_encoder(modality="image")
        logger.info("vision encoder: %s of the %s saved in %s", type(encoder).__name__, type(vlm).__name__, path)
        # Only the encoder's own weights must be there (a VLM saved as its base model has no lm_head).
        prefix = next(name for name, module in vlm.named_modules() if module is encoder) + "."
        info = {"missing_keys": [key for key in info.get("missing_keys") or [] if key.startswith(prefix)]}
    else:
        vision_class = AutoModel._model_mapping[type(vision_config)]
        encoder, info = vision_class.from_pretrained(path, output_loading_info=True)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ValueError(
            f"loading a vision encoder from {path} left {len(missing)} of its weights uninitialised ({missing[:3]}...): "
            f"that directory holds a {type(config).__name__}, not an encoder HIVE can read from it; give a vision "
            "encoder's, CLIP/SigLIP's or a vision-language model's own directory"
        )
    return encoder
