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
    build: Callable[..., torch.nn.Module]  # (seed=0) -> a tiny random base
    pixel_inputs: Callable[[int], dict[str, Any]]  # seed -> kwargs of two samples' images (one image each)
    swap_second: Callable[[dict, dict], dict]  # (inputs, other inputs) -> inputs with the second image from other
    reader: str  # the name of the reader HIVE picks
    # PaliGemma is a prefix LM: its prompt attends both ways, so text before a marker sees text after it (and, through
    # it, the picture). Everywhere else a column before the marker is untouched by the picture.
    causal_prompt: bool = True


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


def qwen_pixels(seed: int, sizes: tuple[tuple[int, int], ...] = ((8, 8), (4, 8))) -> dict[str, Any]:
    """Packed patches as Qwen's image processor lays them out: per image, (rows, columns) patches, block-major.
    Two images of different sizes by default: the padded, masked path."""
    generator = torch.Generator().manual_seed(seed)
    width = 3 * QWEN_TEMPORAL * QWEN_PATCH**2
    patches = sum(rows * columns for rows, columns in sizes)
    return {
        "pixel_values": torch.randn(patches, width, generator=generator),
        "image_grid_thw": torch.tensor([[1, rows, columns] for rows, columns in sizes]),
    }


def qwen_swap_second(inputs: dict, other: dict) -> dict:
    first = int(inputs["image_grid_thw"][0].prod())  # the first image's patches come first
    return dict(inputs, pixel_values=torch.cat([inputs["pixel_values"][:first], other["pixel_values"][first:]]))


# ---------------------------------------------------------------------- Idefics3 / SmolVLM
CROP = 32
CROP_VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=4, num_attention_heads=4, image_size=CROP,
                   patch_size=8)  # fmt: skip


def build_smolvlm(seed: int = 0) -> torch.nn.Module:
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    torch.manual_seed(seed)
    config = SmolVLMConfig(
        text_config=dict(TEXT), vision_config=CROP_VISION, image_token_id=IMAGE_TOKEN, scale_factor=2
    )
    return SmolVLMForConditionalGeneration(config).eval()


def build_idefics3(seed: int = 0) -> torch.nn.Module:
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    torch.manual_seed(seed)
    config = Idefics3Config(
        text_config=dict(TEXT), vision_config=CROP_VISION, image_token_id=IMAGE_TOKEN, scale_factor=2
    )
    return Idefics3ForConditionalGeneration(config).eval()


def crop_pixels(seed: int) -> dict[str, Any]:
    """As Idefics3's image processor returns them: sample 0 one unsplit image (one crop, its bottom 8 pixel rows
    padding), sample 1 one image split into 2x1 crops + its global view; sample 0 padded with all-zero crops."""
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(2, 3, 3, CROP, CROP, generator=generator)
    pixel_values[0, 1:] = 0  # padding crops
    mask = torch.ones(2, 3, CROP, CROP, dtype=torch.long)
    mask[0, 1:] = 0
    mask[0, 0, -8:] = 0  # padded pixels of a smaller image
    pixel_values[0, 0, :, -8:] = 0
    return {"pixel_values": pixel_values, "pixel_attention_mask": mask, "rows": [[0], [2]], "cols": [[0], [1]]}


def crop_swap_second(inputs: dict, other: dict) -> dict:
    pixel_values = inputs["pixel_values"].clone()
    pixel_values[1] = other["pixel_values"][1]
    return dict(inputs, pixel_values=pixel_values)


# ---------------------------------------------------------------------- LLaVA-NeXT / LLaVA-OneVision (anyres)
ANYRES_VISION = dict(CROP_VISION, projection_dim=32)
PINPOINTS = [[CROP, CROP], [CROP, 2 * CROP], [2 * CROP, CROP]]


def build_llava_next(seed: int = 0) -> torch.nn.Module:
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    torch.manual_seed(seed)
    config = LlavaNextConfig(
        text_config=dict(TEXT, model_type="llama"),
        vision_config=dict(ANYRES_VISION, model_type="clip_vision_model"),
        image_token_index=IMAGE_TOKEN,
        image_grid_pinpoints=PINPOINTS,
        image_seq_length=16,
    )
    return LlavaNextForConditionalGeneration(config).eval()


def build_llava_onevision(seed: int = 0) -> torch.nn.Module:
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    torch.manual_seed(seed)
    config = LlavaOnevisionConfig(
        text_config=dict(TEXT, model_type="qwen2"),
        vision_config=dict(CROP_VISION, model_type="siglip_vision_model"),
        image_token_index=IMAGE_TOKEN,
        video_token_index=96,
        image_grid_pinpoints=PINPOINTS,
    )
    return LlavaOnevisionForConditionalGeneration(config).eval()


def anyres_pixels(seed: int) -> dict[str, Any]:
    """As LLaVA-NeXT's image processor returns them: image 0 of 30x60 pixels -> the 32x64 pinpoint, 1x2 crops +
    the whole image (3 crops); image 1 of 32x32 -> 1 crop + the whole image, padded with a zero crop."""
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(2, 3, 3, CROP, CROP, generator=generator)
    pixel_values[1, 2] = 0
    return {"pixel_values": pixel_values, "image_sizes": torch.tensor([[30, 60], [32, 32]])}


# ---------------------------------------------------------------------- InternVL (tiles)
def build_internvl(seed: int = 0) -> torch.nn.Module:
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    torch.manual_seed(seed)
    vision = dict(CROP_VISION, image_size=[CROP, CROP], patch_size=[8, 8])
    config = InternVLConfig(
        text_config=dict(TEXT, model_type="qwen2"), vision_config=vision, image_token_id=IMAGE_TOKEN, image_seq_length=4
    )
    return InternVLForConditionalGeneration(config).eval()


def tile_pixels(seed: int) -> dict[str, Any]:
    """As InternVL's image processor returns them: image 0 in 3 tiles (2 + thumbnail), image 1 in 1, one tensor."""
    generator = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(4, 3, CROP, CROP, generator=generator), "num_patches": torch.tensor([3, 1])}


def tile_swap_second(inputs: dict, other: dict) -> dict:
    return dict(inputs, pixel_values=torch.cat([inputs["pixel_values"][:3], other["pixel_values"][3:]]))


# ---------------------------------------------------------------------- Mistral 3 (Pixtral encoder)
def build_mistral3(seed: int = 0) -> torch.nn.Module:
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    torch.manual_seed(seed)
    vision = dict(CROP_VISION, model_type="pixtral", image_size=CROP, head_dim=8)
    config = Mistral3Config(
        text_config=dict(TEXT, model_type="mistral", head_dim=8), vision_config=vision, image_token_index=IMAGE_TOKEN
    )
    return Mistral3ForConditionalGeneration(config).eval()


def pixtral_pixels(seed: int) -> dict[str, Any]:
    """As Pixtral's image processor returns them: image 0 of 32x32 pixels, image 1 of 16x24, padded to 32x32."""
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(2, 3, CROP, CROP, generator=generator)
    pixel_values[1, :, 16:] = 0
    pixel_values[1, :, :, 24:] = 0
    return {"pixel_values": pixel_values, "image_sizes": torch.tensor([[CROP, CROP], [16, 24]])}


# ---------------------------------------------------------------------- Gemma 4 (patchified, positions)
GEMMA4_PATCH = 4


def build_gemma4(seed: int = 0) -> torch.nn.Module:
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    torch.manual_seed(seed)
    text = dict(TEXT, head_dim=8, vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=8, sliding_window=16)
    text["layer_types"] = ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"]
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                  head_dim=8, patch_size=GEMMA4_PATCH, pooling_kernel_size=2, position_embedding_size=64)  # fmt: skip
    tokens = dict(boi_token_id=96, eoi_token_id=97, video_token_id=98, audio_token_id=94, boa_token_id=93)
    config = Gemma4Config(
        text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN, eoa_token_index=92, **tokens
    )
    return Gemma4ForConditionalGeneration(config).eval()


def gemma4_pixels(seed: int) -> dict[str, Any]:
    """As Gemma 4's image processor returns them: image 0 a 4x4 patch grid, image 1 a 2x4 grid padded to 16 patches
    with (-1, -1) positions."""
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(2, 16, 3 * GEMMA4_PATCH**2, generator=generator)
    y, x = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    positions = torch.stack([x.flatten(), y.flatten()], dim=-1).repeat(2, 1, 1)  # (2, 16, 2) of (x, y)
    positions[1, 8:] = -1
    pixel_values[1, 8:] = 0
    return {"pixel_values": pixel_values, "image_position_ids": positions}


# ---------------------------------------------------------------------- Gemma 3, PaliGemma (SigLIP, (B, 3, H, W))
SIGLIP = dict(CROP_VISION, model_type="siglip_vision_model")


def build_gemma3(seed: int = 0) -> torch.nn.Module:
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    torch.manual_seed(seed)
    text = dict(TEXT, model_type="gemma3_text", head_dim=8, sliding_window=16)
    config = Gemma3Config(text_config=text, vision_config=SIGLIP, image_token_index=IMAGE_TOKEN, mm_tokens_per_image=4,
                          boi_token_index=96, eoi_token_index=97)  # fmt: skip
    return Gemma3ForConditionalGeneration(config).eval()


def build_paligemma(seed: int = 0) -> torch.nn.Module:
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    torch.manual_seed(seed)
    config = PaliGemmaConfig(
        text_config=dict(TEXT, model_type="gemma", head_dim=8), vision_config=SIGLIP, image_token_index=IMAGE_TOKEN
    )
    return PaliGemmaForConditionalGeneration(config).eval()


def vit_pixels(seed: int) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(2, 3, CROP, CROP, generator=generator)}


QWEN = dict(pixel_inputs=qwen_pixels, swap_second=qwen_swap_second, reader="qwen-packed-patches")
CROPS = dict(pixel_inputs=crop_pixels, swap_second=crop_swap_second, reader="idefics3-crops")
ANYRES = dict(pixel_inputs=anyres_pixels, swap_second=crop_swap_second, reader="llava-anyres")
FAMILIES: dict[str, FamilyCase] = {
    "llava_next": FamilyCase("llava_next", build_llava_next, **ANYRES),
    "gemma3": FamilyCase("gemma3", build_gemma3, vit_pixels, crop_swap_second, "vit"),
    "paligemma": FamilyCase("paligemma", build_paligemma, vit_pixels, crop_swap_second, "vit", causal_prompt=False),
    "gemma4": FamilyCase("gemma4", build_gemma4, gemma4_pixels, crop_swap_second, "gemma4-positioned-patches"),
    "mistral3": FamilyCase("mistral3", build_mistral3, pixtral_pixels, crop_swap_second, "pixtral-variable-sizes"),
    "internvl": FamilyCase("internvl", build_internvl, tile_pixels, tile_swap_second, "internvl-tiles"),
    "llava_onevision": FamilyCase("llava_onevision", build_llava_onevision, **ANYRES),
    "qwen2_5_vl": FamilyCase("qwen2_5_vl", build_qwen2_5_vl, **QWEN),
    "qwen2_vl": FamilyCase("qwen2_vl", build_qwen2_vl, **QWEN),
    "qwen3_vl": FamilyCase("qwen3_vl", build_qwen3_vl, **QWEN),
    "smolvlm": FamilyCase("smolvlm", build_smolvlm, **CROPS),
    "idefics3": FamilyCase("idefics3", build_idefics3, **CROPS),
}


def marker_text(batch: int, length: int, *, marker_at: int, seed: int = 3) -> torch.Tensor:
    """(batch, length) token ids with one image marker per sample at `marker_at`, no other special token."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, IMAGE_TOKEN - 1, (batch, length), generator=generator)
    ids[:, marker_at] = IMAGE_TOKEN
    return ids


# ---------------------------------------------------------------------- batches and gates, for every family
LENGTH, MARKER_AT = 10, 2


def batch_of(name: str, *, seed: int = 5) -> dict:
    """Two samples, one image each (of different sizes where the family allows), the marker at MARKER_AT."""
    return {"input_ids": marker_text(2, LENGTH, marker_at=MARKER_AT), **FAMILIES[name].pixel_inputs(seed)}


def text_only(batch: dict) -> dict:
    return {"input_ids": batch["input_ids"]}


class open_gates:
    """Gates at `value` inside the block, back to 0 after (the session's models stay at init)."""

    def __init__(self, model, value: float = 1.0):
        self.model, self.value = model, value

    def __enter__(self):
        from tiny_models import set_gates

        set_gates(self.model, self.value)

    def __exit__(self, *exc):
        from tiny_models import set_gates

        set_gates(self.model, 0.0)
