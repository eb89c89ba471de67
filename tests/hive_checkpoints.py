"""Saved tiny HIVE checkpoints (every connector) with tokenizer and image processor, as `hive-train` writes them.

Gates are opened (0.5) so the vision side influences the text and receives gradients, as after training.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer

import hive_adapter as hive
from hive_adapter.data.synthetic import caption_vocabulary
from hive_adapter.loading import load_vision_encoder
from hive_adapter.toy import ToySizes, write_toy_models

SIZES = ToySizes(image_size=32, patch_size=8, vision_width=32, vision_layers=4, text_width=64, text_layers=2)
VISION_LAYERS = [1, 3]  # of 4: layers 2 and 4 (1-based) feed HIVE


def toy_models(directory: Path) -> tuple[Path, Path]:
    return write_toy_models(directory, caption_vocabulary(), sizes=SIZES)


@torch.no_grad()
def save_hive_checkpoint(models: tuple[Path, Path], directory: Path, *, connector: str = "hive", **overrides) -> Path:
    vision_dir, language_dir = models
    torch.manual_seed(0)
    settings = dict(vision_layers=VISION_LAYERS, llm_layers=[0, 1], connector=connector, tokens_per_level=4)
    config = hive.HiveConfig(**{**settings, **overrides})
    model = hive.HiveForConditionalGeneration.from_vision_text(
        load_vision_encoder(vision_dir), AutoModelForCausalLM.from_pretrained(language_dir), config
    )
    for name, param in model.named_parameters():
        if name.endswith(("hive_attn_gate", "hive_ffn_gate")):
            param.fill_(0.5)
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(language_dir).save_pretrained(directory)
    AutoImageProcessor.from_pretrained(vision_dir).save_pretrained(directory)
    return directory
