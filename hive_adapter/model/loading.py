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
    """A vision encoder from a vision-only checkpoint or the vision half of a CLIP/SigLIP checkpoint."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(path)
    vision_config = getattr(config, "vision_config", None)
    if vision_config is None:
        return AutoModel.from_pretrained(path)
    vision_class = AutoModel._model_mapping[type(vision_config)]
    return vision_class.from_pretrained(path)
