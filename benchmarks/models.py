"""Build the compared models and one training batch for them, on any device (`meta` included).

Modes: `hive` (multi-level gated cross-attention), `cascaded` (same depths, deepest level only),
`concat` (LLaVA-style: the deepest level's tokens spliced into the LLM input), `deepstack` (Qwen3-VL's:
concat's splice, the shallower levels added in the first decoder layers at the image tokens) and `text` (the LLM
on the text alone: the floor every mode pays). `hive_pooled` is `hive` with every level pooled to 144
tokens; `hive_lean` is `hive` with the lean projector (one layer to the narrow width the K/V read, every
patch kept). All are this library's classes; `text` is the bare `LlamaForCausalLM`.
"""

from __future__ import annotations

import torch
from transformers import LlamaForCausalLM

from hive_adapter import HiveConfig, HiveForConditionalGeneration
from hive_adapter.training.stages import STAGES, apply_stage

from .configs import IMAGE_TOKEN_ID, ModelPair

MODES = ("hive", "hive_pooled", "hive_lean", "cascaded", "concat", "deepstack", "text")
SPLICING = ("concat", "deepstack")  # image tokens enter the LLM sequence
HIVE_VARIANTS = {"hive_pooled": dict(tokens_per_level=144), "hive_lean": dict(projector_type="lean")}
POOLED_TOKENS = HIVE_VARIANTS["hive_pooled"]["tokens_per_level"]  # a 12x12 grid per level, before its projector


def build(
    pair: ModelPair,
    mode: str,
    *,
    device: str | torch.device = "meta",
    image_size: int | None = None,
    dtype: torch.dtype | None = None,
    attn_implementation: str = "sdpa",
):
    """The model of `mode` for `pair`, its weights on `device` (random where real); `attn_implementation` for the
    vision tower, the LLM and HIVE's cross-attention alike."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {', '.join(MODES)}")
    with torch.device(device):
        if mode == "text":
            model = LlamaForCausalLM(pair.text_config())
        else:
            config = HiveConfig(
                connector="hive" if mode in HIVE_VARIANTS else mode,
                vision_config=pair.vision_config(image_size),
                text_config=pair.text_config(),
                image_token_id=IMAGE_TOKEN_ID,
                **HIVE_VARIANTS.get(mode, {}),
                **({} if mode == "concat" else pair.hive_layers),
            )
            model = HiveForConditionalGeneration(config)
    if dtype is not None:
        model.to(dtype)
    use_kernel(model, attn_implementation)
    return model


def use_kernel(model: torch.nn.Module, implementation: str) -> None:
    """Every attention of `model` (vision tower, LLM, HIVE's blocks) on `implementation`, set on the configs directly:
    transformers' availability check refuses flash_attention_2 before the weights reach the GPU, and on CPU (where
    `benchmarks.flash_reference` stands in for flash-attn). Whether the kernel really ran is a spy's to say."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation_internal"):
            config._attn_implementation_internal = implementation
    if hasattr(model, "hive_follow_attn_implementation"):
        model.hive_follow_attn_implementation()


def set_stage(model, mode: str, stage: int) -> None:
    """Stage 1: only the new modules train; 2: + the LLM; 3: + the vision tower (paper Table 3)."""
    if mode == "text":
        model.requires_grad_(stage >= 2)
        return
    apply_stage(model, STAGES[stage])


def sequence_length(pair: ModelPair, mode: str, text_tokens: int, image_size: int | None = None) -> int:
    """Tokens the LLM's self-attention runs over: concat and deepstack replace the marker by the image's patches."""
    if mode in SPLICING:
        return text_tokens - 1 + pair.vision_tokens(image_size)
    return text_tokens


def training_batch(
    pair: ModelPair,
    mode: str,
    *,
    batch: int,
    text_tokens: int,
    device,
    image_size: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """One image per sample, its marker in front of the text; labels on every text token.

    On `meta` a ready 4-D causal mask is passed (transformers' mask builder reads tensor values,
    which `meta` does not have); elsewhere the library builds its own masks.
    """
    ids = torch.full((batch, text_tokens), 7, dtype=torch.long, device=device)
    if mode != "text":
        ids[:, 0] = IMAGE_TOKEN_ID
    inputs = {"input_ids": ids, "labels": ids}
    if mode != "text":
        size = image_size or pair.vision["image_size"]
        inputs["pixel_values"] = torch.zeros(batch, 3, size, size, device=device, dtype=dtype)
    if torch.device(device).type == "meta":
        length = sequence_length(pair, mode, text_tokens, image_size)
        inputs["attention_mask"] = torch.ones(batch, 1, length, length, dtype=torch.bool, device=device).tril()
    return inputs


def training_step(model, inputs: dict) -> torch.Tensor:
    """Forward and, when anything trains, backward; returns the loss."""
    loss = model(**inputs).loss
    if loss.requires_grad:
        loss.backward()
    return loss
