"""Tiny random models of the VLM families HIVE wraps, built from each family's own config class (no downloads),
and their inputs in the family's own pixel format. Shared by tests/test_families.py through session fixtures.

Each `FamilyCase` says how to build the base, which placeholder token marks an image, and how to make a batch of
`images` pictures (one marker per image) in the family's format: `pixel_inputs(seed, sizes)` returns the kwargs
the family's forward takes beside the text (`pixel_values`, `image_grid_thw`, ...).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

VOCAB = 99
IMAGE_TOKEN = 95  # the family's image placeholder, as its config names it
TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
MROPE = {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0}


@dataclass(frozen=True)
class FamilyCase:
    name: str
    build: Callable[[], torch.nn.Module]
    pixel_inputs: Callable[[int, list[tuple[int, int]]], dict[str, Any]]  # (seed, per-image size) -> kwargs
    sizes: tuple[tuple[int, int], ...]  # the image sizes (in patches) a two-image batch uses


# ---------------------------------------------------------------------- Qwen2-VL / Qwen2.5-VL / Qwen3-VL
QWEN_PATCH, QWEN_TEMPORAL = 4, 2
QWEN_VISION = dict(depth=4, hidden_size=32, intermediate_size=37, num_heads=4, out_hidden_size=32,
                   patch_size=QWEN_PATCH, spatial_merge_size=2, temporal_patch_size=QWEN_TEMPORAL)  # fmt: skip
QWEN_TOKENS = dict(image_token_id=IMAGE_TOKEN, video_token_id=96, vision_start_token_id=97, vision_end_token_id=98)


def build_qwen2_5_vl(seed: int = 0) -> torch.nn.Module:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    vision = dict(QWEN_VISION, window_size=16, fullatt_block_indexes=[3])  # 2x2-block windows: the order matters
    config = Qwen2_5_VLConfig(text_config=dict(TEXT, rope_parameters=MROPE), vision_config=vision, **QWEN_TOKENS)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def build_qwen2_vl(seed: int = 0) -> torch.nn.Module:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    vision = dict(depth=4, embed_dim=32, hidden_size=32, mlp_ratio=2, num_heads=4, patch_size=QWEN_PATCH,
                  spatial_merge_size=2, temporal_patch_size=QWEN_TEMPORAL)  # fmt: skip
    config = Qwen2VLConfig(text_config=dict(TEXT, rope_parameters=MROPE), vision_config=vision, **QWEN_TOKENS)
    return Qwen2VLForConditionalGeneration(config).eval()


def build_qwen3_vl(seed: int = 0) -> torch.nn.Module:
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    vision = dict(QWEN_VISION, deepstack_visual_indexes=[1, 2], num_position_embeddings=64)
    text = dict(TEXT, head_dim=8, rope_parameters={**MROPE, "mrope_section": [1, 1, 2], "mrope_interleaved": True})
    config = Qwen3VLConfig(text_config=text, vision_config=vision, **QWEN_TOKENS)
    return Qwen3VLForConditionalGeneration(config).eval()


def qwen_pixels(seed: int, sizes: list[tuple[int, int]]) -> dict[str, Any]:
    """Packed patches as Qwen's image processor lays them out: per image, (rows, columns) patches, block-major."""
    generator = torch.Generator().manual_seed(seed)
    width = 3 * QWEN_TEMPORAL * QWEN_PATCH**2
    patches = sum(rows * columns for rows, columns in sizes)
    return {
        "pixel_values": torch.randn(patches, width, generator=generator),
        "image_grid_thw": torch.tensor([[1, rows, columns] for rows, columns in sizes]),
    }


QWEN_SIZES = ((8, 8), (4, 8))  # two images of different sizes: the padded, masked path
FAMILIES: dict[str, FamilyCase] = {
    "qwen2_5_vl": FamilyCase("qwen2_5_vl", build_qwen2_5_vl, qwen_pixels, QWEN_SIZES),
    "qwen2_vl": FamilyCase("qwen2_vl", build_qwen2_vl, qwen_pixels, QWEN_SIZES),
    "qwen3_vl": FamilyCase("qwen3_vl", build_qwen3_vl, qwen_pixels, QWEN_SIZES),
}


def marker_text(batch: int, length: int, *, marker_at: int, seed: int = 3) -> torch.Tensor:
    """(batch, length) token ids with one image marker per sample at `marker_at`, no other special token."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, IMAGE_TOKEN - 1, (batch, length), generator=generator)
    ids[:, marker_at] = IMAGE_TOKEN
    return ids
