"""Saved tiny HIVE checkpoints (every connector) with tokenizer and image processor, as `hive-train` writes them.

Gates are opened (0.5) so the vision side influences the text and receives gradients, as after training.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer

import hive_adapter as hive
from hive_adapter.data.synthetic import caption_vocabulary
from hive_adapter.model.loading import load_vision_encoder
from hive_adapter.tools.toy_models import ToySizes, write_toy_models

SIZES = ToySizes(image_size=32, patch_size=8, vision_width=32, vision_layers=4, text_width=64, text_layers=2)
VISION_LAYERS = [1, 3]  # of 4: layers 2 and 4 (1-based) feed HIVE


def toy_models(directory: Path) -> tuple[Path, Path]:
    return write_toy_models(directory, caption_vocabulary(), sizes=SIZES)


@torch.no_grad()
def save_hive_checkpoint(
    models: tuple[Path, Path], directory: Path, *, connector: str = "hive", loud: bool = False, **overrides
) -> Path:
    """`loud`: HIVE's matrices drawn at std 0.3 and gates fully open (1.0), so that greedy answers differ from
    picture to picture (`solid_images`): what a test needs to see that each request got its own image."""
    vision_dir, language_dir = models
    torch.manual_seed(0)
    settings = dict(vision_layers=VISION_LAYERS, llm_layers=[0, 1], connector=connector, tokens_per_level=4)
    config = hive.HiveConfig(**{**settings, **overrides})
    model = hive.HiveForConditionalGeneration.from_vision_text(
        load_vision_encoder(vision_dir), AutoModelForCausalLM.from_pretrained(language_dir), config
    )
    if loud:
        make_loud(model)
    else:
        for name, param in model.named_parameters():
            if name.endswith(("hive_attn_gate", "hive_ffn_gate")):
                param.fill_(0.5)
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(language_dir).save_pretrained(directory)
    AutoImageProcessor.from_pretrained(vision_dir).save_pretrained(directory)
    return directory


@torch.no_grad()
def make_loud(model: torch.nn.Module) -> None:
    """HIVE's matrices drawn at std 0.3 and its gates fully open (1.0): greedy answers then differ from picture to
    picture, so a test can see that each request got its own image."""
    for name, param in model.named_parameters():
        if "hive" in name and param.ndim == 2:
            param.normal_(0, 0.3)
        if name.endswith(("hive_attn_gate", "hive_ffn_gate")):
            param.fill_(1.0)


def solid_images(count: int, *, size: int = 32, seed: int = 0) -> list:
    """`count` single-colour pictures: a loud checkpoint answers several of them differently."""
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    colours = torch.randint(0, 256, (count, 3), generator=generator).tolist()
    return [Image.new("RGB", (size, size), tuple(colour)) for colour in colours]


@torch.no_grad()
def save_llava_hf_with_adapter(directory: Path) -> tuple[Path, Path]:
    """A tiny llava-hf base (model + LlavaProcessor, word tokenizer with `<image>`) and a HIVE adapter for it."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from hive_adapter.tools.toy_models import word_tokenizer

    tokenizer = word_tokenizer(caption_vocabulary() + ["what", "shape", "is", "colour", "?"])
    torch.manual_seed(0)
    base = LlavaForConditionalGeneration(LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                                       image_size=32, patch_size=8),
        text_config=LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=len(tokenizer)),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    ))  # fmt: skip
    base.save_pretrained(directory / "base")
    LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
    ).save_pretrained(directory / "base")  # fmt: skip
    model = hive.get_hive_model(base, hive.HiveConfig(vision_layers=[1, 3], llm_layers=[0, 1], tokens_per_level=4))
    for name, param in model.named_parameters():
        if name.endswith("hive_attn_gate"):
            param.fill_(0.5)
    model.save_pretrained(directory / "adapter")
    return directory / "base", directory / "adapter"
