"""How HIVE's modules are built and initialised from a `HiveConfig` and the two models' shapes.

Shared by every front end (`HiveModel`, `HiveForConditionalGeneration`, the LLaVA integration): the level
encoder (one projector per selected vision level), the gated cross-attention blocks with their head counts
resolved against the language model, and the initialisation every construction path applies
(docs/ARCHITECTURE.md §7.5: a freshly built or partially loaded model never holds uninitialised memory).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .architectures import TextShape, VisionShape
from .config import HiveConfig
from .connectors import connector_for
from .cross_attention import HiveCrossAttention, HiveCrossAttentionBlock, HiveLayerNorm
from .layer_choice import ResolvedLayers
from .levels import HiveLevelEncoder


def cross_attention_kernel(config: HiveConfig, text_config) -> str:
    """HIVE's own setting, else the language model's attention implementation, else SDPA."""
    if config.cross_attn_implementation is not None:
        return config.cross_attn_implementation
    implementation = getattr(text_config, "_attn_implementation", None)
    return implementation if implementation in ("eager", "flash_attention_2") else "sdpa"


def kv_shape(config: HiveConfig, text: TextShape) -> tuple[int, int, int]:
    """(query heads, K/V heads, head width) of the cross-attention; defaults follow the language model (its
    query heads, its grouped K/V heads, its head width)."""
    heads = config.num_attention_heads or text.num_heads
    kv_heads = config.num_key_value_heads or (text.num_kv_heads if config.num_attention_heads is None else heads)
    if heads % kv_heads:
        raise ValueError(
            f"num_key_value_heads={kv_heads}: must divide num_attention_heads={heads} (grouped-query attention)"
        )
    head_dim = config.head_dim or (text.head_dim if config.num_attention_heads is None else text.hidden_size // heads)
    return heads, kv_heads, head_dim


def media_width(config: HiveConfig, vision: VisionShape, text: TextShape) -> int:
    """Width of the projected levels: the LLM width, or for the lean projector `media_width`, by default no
    wider than what either side carries: the vision width, and the K/V width the levels are projected to
    (keys and values together: twice the grouped K/V width)."""
    if config.projector_type != "lean":
        return text.hidden_size
    _, kv_heads, head_dim = kv_shape(config, text)
    return config.media_width or min(vision.hidden_size, 2 * kv_heads * head_dim)


def build_level_encoder(
    config: HiveConfig, resolved: ResolvedLayers, vision: VisionShape, text: TextShape
) -> HiveLevelEncoder:
    """One projector per selected vision level (plus level embeddings when every block sees every level)."""
    return HiveLevelEncoder(
        num_levels=len(resolved.vision_layers),
        projector_type=config.projector_type,
        vision_hidden_size=vision.hidden_size,
        output_size=media_width(config, vision, text),
        tokens_per_level=config.tokens_per_level,
        keep_prefix_tokens=config.vision_feature_select == "full",
        level_embedding=connector_for(config.connector).level_embedding(config),
    )


def block_factory(
    config: HiveConfig, vision: VisionShape, text: TextShape, kernel: str
) -> Callable[[], HiveCrossAttentionBlock]:
    """A constructor for the gated cross-attention blocks, with head counts resolved against the LM."""
    heads, kv_heads, head_dim = kv_shape(config, text)
    media = media_width(config, vision, text)

    def make_block() -> HiveCrossAttentionBlock:
        attention = HiveCrossAttention(
            hidden_size=text.hidden_size,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            media_size=media,
            implementation=kernel,
        )
        return HiveCrossAttentionBlock(
            attention,
            use_ffn=config.use_ffn,
            ffn_mult=config.ffn_mult,
            gate_init=config.gate_init,
            norm_eps=text.norm_eps,
        )

    return make_block


def _initialise(tensor: torch.Tensor, fill: Callable[[torch.Tensor], Any]) -> None:
    """`fill(tensor)` unless transformers marked the tensor as loaded from a checkpoint (5.x `from_pretrained`)."""
    if not getattr(tensor, "_is_hf_initialized", False):
        fill(tensor)


def initial_std(config: HiveConfig, width: int) -> float:
    """The std a new HIVE tensor starts with: `config.initializer_range`, or where that is None, scaled to the
    width the tensor reads (1/sqrt(fan_in), LeCun's normal: unit-variance inputs give unit-variance outputs)."""
    if config.initializer_range is not None:
        return config.initializer_range
    return 1.0 / math.sqrt(width)


@torch.no_grad()
def init_hive_module(module: nn.Module, config: HiveConfig) -> None:
    """Initialise the tensors a HIVE module holds itself (not its children's): linear weights ~ N(0, std) with
    std from `initial_std` (the layer's input width), level embeddings likewise (their width), zero biases,
    unit norms, gates at `gate_init` (0: the base's computation). Tensors that `from_pretrained` already
    loaded are left alone, so a checkpoint missing some HIVE keys gets exactly those initialised.

    Per module, as transformers' `_init_weights` is called: it skips modules without tensors of their own.
    """
    if isinstance(module, nn.Linear):
        std = initial_std(config, module.in_features)
        _initialise(module.weight, lambda t: t.normal_(mean=0.0, std=std))
        if module.bias is not None:
            _initialise(module.bias, torch.Tensor.zero_)
    elif isinstance(module, HiveLayerNorm):
        _initialise(module.weight, lambda t: t.fill_(1.0))
        _initialise(module.bias, torch.Tensor.zero_)
    elif isinstance(module, HiveCrossAttentionBlock):
        for gate in (module.hive_attn_gate, getattr(module, "hive_ffn_gate", None)):
            if gate is not None:
                _initialise(gate, lambda t: t.fill_(config.gate_init))
    elif isinstance(module, HiveLevelEncoder) and module.level_embedding is not None:
        std = initial_std(config, module.level_embedding.shape[-1])
        _initialise(module.level_embedding, lambda t: t.normal_(mean=0.0, std=std))


def init_hive_weights(module: nn.Module, config: HiveConfig) -> None:
    """`init_hive_module` on a HIVE module and everything inside it."""
    for sub in module.modules():
        init_hive_module(sub, config)
