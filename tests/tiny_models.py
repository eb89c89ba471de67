"""Tiny real transformers models, built in code (no hub): the architectures HIVE must support.

Each entry is one row of a case table; a new architecture is one more row.
"""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Siglip2VisionConfig,
    Siglip2VisionModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

VOCAB = 96
IMAGE_TOKEN = 95
IMAGE_SIZE = 32
PATCH = 8  # 4x4 = 16 patches

_VISION_COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2)
_TEXT_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=256,
)

VISION_BUILDERS = {
    "clip": lambda: CLIPVisionModel(CLIPVisionConfig(**_VISION_COMMON, image_size=IMAGE_SIZE, patch_size=PATCH)),
    "siglip": lambda: SiglipVisionModel(SiglipVisionConfig(**_VISION_COMMON, image_size=IMAGE_SIZE, patch_size=PATCH)),
    "siglip2": lambda: Siglip2VisionModel(Siglip2VisionConfig(**_VISION_COMMON, num_patches=16, patch_size=PATCH)),
    "dinov2": lambda: Dinov2Model(Dinov2Config(**_VISION_COMMON, image_size=IMAGE_SIZE, patch_size=PATCH)),
}

TEXT_BUILDERS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**_TEXT_COMMON)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**_TEXT_COMMON)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**_TEXT_COMMON, head_dim=16)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**_TEXT_COMMON)),
    "gemma2": lambda: Gemma2ForCausalLM(Gemma2Config(**_TEXT_COMMON, head_dim=16)),
}


def build_vision(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return VISION_BUILDERS[name]().eval()


def build_text(name: str, seed: int = 1):
    torch.manual_seed(seed)
    return TEXT_BUILDERS[name]().eval()


def build_llava(seed: int = 0, num_text_layers: int = 4) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**_VISION_COMMON, image_size=IMAGE_SIZE, patch_size=PATCH),
        text_config=LlamaConfig(**{**_TEXT_COMMON, "num_hidden_layers": num_text_layers}),
        image_token_index=IMAGE_TOKEN,
    )
    return LlavaForConditionalGeneration(config).eval()


def vision_inputs(name: str, num_images: int, seed: int = 2) -> dict[str, torch.Tensor]:
    """Pixel inputs in the encoder's own format (SigLIP2 takes patchified pixels + grid shapes)."""
    generator = torch.Generator().manual_seed(seed)
    if name == "siglip2":
        side = IMAGE_SIZE // PATCH
        return {
            "pixel_values": torch.randn(num_images, side * side, 3 * PATCH * PATCH, generator=generator),
            "pixel_attention_mask": torch.ones(num_images, side * side, dtype=torch.long),
            "spatial_shapes": torch.tensor([[side, side]] * num_images),
        }
    return {"pixel_values": torch.randn(num_images, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)}


def text_ids(batch: int, length: int, *, marker_at: int | None = None, seed: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, IMAGE_TOKEN - 1, (batch, length), generator=generator)
    if marker_at is not None:
        ids[:, marker_at] = IMAGE_TOKEN
    return ids


@torch.no_grad()
def set_gates(model: torch.nn.Module, value: float) -> None:
    """Open the zero-initialised gates so HIVE's contribution (and its gradients) become visible."""
    for name, param in model.named_parameters():
        if name.endswith("hive_attn_gate") or name.endswith("hive_ffn_gate"):
            param.fill_(value)


def spliced_position_ids(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """concat, deepstack: the position ids of the spliced rows its language model runs on (packed rows: the image tokens
    inside each sample, the positions restarting at each sample)."""
    seen = {}
    handle = model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(kwargs), with_kwargs=True
    )
    with torch.no_grad():
        model(**batch)
    handle.remove()
    return seen["position_ids"]


def loss_and_grads(model: torch.nn.Module, batch: dict):
    """The model's output on `batch` (labels in it) and the gradients its loss leaves, by parameter name."""
    model.zero_grad(set_to_none=True)
    output = model(**batch)
    output.loss.backward()
    return output, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_packed_equals_padded(
    model: torch.nn.Module, packed: dict, padded: dict, *, spans: dict[int, tuple[int, int, int]] | None = None
) -> None:
    """Packed rows give the padded batch's loss and gradients (HIVE's among them), within float32 tolerance; with
    `spans` (sample -> (row, first column, length) in the packed rows) each sample's logits are its padded row's."""
    want, want_grads = loss_and_grads(model, padded)
    got, got_grads = loss_and_grads(model, packed)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    assert got_grads.keys() == want_grads.keys() and any("hive_" in name for name in got_grads)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    for sample, (row, start, length) in (spans or {}).items():
        torch.testing.assert_close(
            got.logits[row, start : start + length], want.logits[sample, :length], rtol=1e-4, atol=1e-5
        )
