"""Tiny HIVE checkpoints vLLM can serve on CPU, saved as `save_pretrained` writes them, with their processor.

vLLM's CPU attention takes head widths of 32, 64, 80, ... (not the 16 of the main suite's toys): the language model
here is 256 wide with 4 heads of 64. Two HIVE blocks (decoder layers 0 and 1) read vision levels 2 and 4 of 4.
"""

from __future__ import annotations

from pathlib import Path

from hive_checkpoints import save_hive_checkpoint
from transformers import AutoImageProcessor, AutoTokenizer

import hive_adapter as hive
from hive_adapter.data.synthetic import caption_vocabulary
from hive_adapter.tools.toy_models import ToySizes, write_toy_models

SIZES = ToySizes(image_size=32, patch_size=8, vision_width=32, vision_layers=4, text_width=256, text_layers=2)


def toy_models(directory: Path) -> tuple[Path, Path]:
    return write_toy_models(directory, caption_vocabulary(), sizes=SIZES)


def save_servable_checkpoint(models: tuple[Path, Path], directory: Path, *, marker: bool, **overrides) -> Path:
    """A loud HIVE checkpoint (different pictures, different greedy answers) with its `HiveProcessor`."""
    tokenizer = AutoTokenizer.from_pretrained(models[1])
    if marker:
        overrides["image_token_id"] = tokenizer.convert_tokens_to_ids("<image>")
    save_hive_checkpoint(models, directory, loud=True, **overrides)
    config = hive.HiveConfig.from_pretrained(directory)
    hive.HiveProcessor.for_model(
        config, tokenizer=tokenizer, image_processor=AutoImageProcessor.from_pretrained(models[0])
    ).save_pretrained(directory)
    return directory
