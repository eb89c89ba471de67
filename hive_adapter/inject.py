"""Wrap chosen decoder layers of any HF language model with a HIVE block, and unwrap them exactly.

Like OpenFlamingo's `FlamingoLayer` and PEFT's `AdaptedAttention`, the base layer is wrapped, never
re-implemented and never re-classed: `HiveDecoderLayer.forward(*args, **kwargs)` passes whatever the
installed transformers version hands a decoder layer straight through, and only rewrites the hidden
states. Removal puts the very same module objects back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .context import HiveRuntime, past_length_of
from .cross_attention import HiveCrossAttentionBlock

logger = logging.getLogger(__name__)


class HiveDecoderLayer(nn.Module):
    """A decoder layer with a gated cross-attention block run before (or after) it."""

    # Read by transformers' `gradient_checkpointing_enable`, which also sets `_gradient_checkpointing_func`.
    gradient_checkpointing = False

    def __init__(
        self,
        *,
        base_layer: nn.Module,
        hive_block: HiveCrossAttentionBlock,
        block_index: int,
        level_index: int | None,
        placement: str,
        runtime: HiveRuntime,
    ):
        super().__init__()
        self.base_layer = base_layer
        self.hive_block = hive_block
        self.block_index = block_index
        self.level_index = level_index
        self.placement = placement
        self.runtime = runtime
        self._replay_inputs: tuple[torch.Tensor, ...] | None = None

    def forward(self, *args, **kwargs):
        if self.placement == "before":
            if args:
                hidden, args = args[0], args[1:]
            else:
                hidden = kwargs.pop("hidden_states")
            # Positional, as GradientCheckpointingLayer needs for reentrant checkpointing.
            return self.base_layer(self.apply_hive(hidden), *args, **kwargs)
        output = self.base_layer(*args, **kwargs)
        if isinstance(output, tuple):  # transformers < 4.48 returns (hidden_states, ...)
            return (self.apply_hive(output[0]), *output[1:])
        return self.apply_hive(output)

    def hive_inputs(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """key, value, visible, has_media for this layer's block and a batch of hidden states."""
        context = self.runtime.context_for(hidden)
        key, value = context.key_values(self.block_index, self.level_index, self.hive_block)
        positions = self.runtime.query_positions(hidden.shape[1], hidden.device)
        visible, has_media = context.visibility(positions, self.level_index)
        return key, value, visible, has_media

    def apply_hive(self, hidden: torch.Tensor) -> torch.Tensor:
        if self._replay_inputs is not None:  # inside a stack-level checkpoint (transformers < 4.48)
            hidden, _ = self.hive_block(hidden, *self._replay_inputs)
            return hidden
        context = self.runtime.context_for(hidden)
        key, value, visible, has_media = self.hive_inputs(hidden)
        if context.record_attention:
            hidden, weights = self.hive_block(hidden, key, value, visible, has_media, return_weights=True)
            context.attention_maps[self.block_index] = weights.detach()
            return hidden
        if self.gradient_checkpointing and self.training:
            # K/V and masks go in as explicit inputs, so reentrant checkpointing routes their gradients too.
            hidden, _ = self._gradient_checkpointing_func(self.hive_block, hidden, key, value, visible, has_media)
            return hidden
        hidden, _ = self.hive_block(hidden, key, value, visible, has_media)
        return hidden


def hive_aware_checkpoint(checkpoint_function: Callable) -> Callable:
    """Wrap a decoder stack's `_gradient_checkpointing_func` so HIVE layers checkpoint correctly.

    transformers < 4.48 checkpoints each decoder layer from the stack (`checkpoint(layer.__call__, hidden,
    ...)`). A HIVE layer read inside that call would capture the vision K/V by closure, which reentrant
    checkpointing cannot differentiate (and frozen hidden states make the whole output grad-less). Here
    the K/V and masks are computed first and handed to the checkpoint as explicit inputs.
    """

    def checkpoint_with_hive(function, *args, **kwargs):
        layer = getattr(function, "__self__", None)
        if not isinstance(layer, HiveDecoderLayer) or not args:
            return checkpoint_function(function, *args, **kwargs)
        hive_tensors = layer.hive_inputs(args[0])
        count = len(args)

        def replay(*all_args):
            layer._replay_inputs = all_args[count:]
            try:
                return function(*all_args[:count], **kwargs)
            finally:
                layer._replay_inputs = None

        return checkpoint_function(replay, *args, *hive_tensors)

    checkpoint_with_hive.hive_original = checkpoint_function
    return checkpoint_with_hive


@dataclass
class HiveInjection:
    """What `inject_hive` changed, so `remove()` can put it back exactly."""

    layers: nn.ModuleList
    layers_path: str
    originals: dict[int, nn.Module] = field(default_factory=dict)
    hook_handle: torch.utils.hooks.RemovableHandle | None = None
    stack: nn.Module | None = None

    def remove(self) -> None:
        for index, original in self.originals.items():
            self.layers[index] = original
        self.originals.clear()
        if self.hook_handle is not None:
            self.hook_handle.remove()
            self.hook_handle = None
        wrapped = getattr(self.stack, "_gradient_checkpointing_func", None)
        if wrapped is not None and hasattr(wrapped, "hive_original"):
            self.stack._gradient_checkpointing_func = wrapped.hive_original


def find_layer_owner(root: nn.Module, layers: nn.ModuleList) -> nn.Module:
    """The module whose forward runs `layers` (the decoder stack, e.g. `LlamaModel`)."""
    for module in root.modules():
        if any(child is layers for child in module.children()):
            return module
    raise ValueError("the decoder layer list is not a child of any module in the model")


def inject_hive(
    *,
    model: nn.Module,
    layers: nn.ModuleList,
    layers_path: str,
    llm_layers: tuple[int, ...],
    level_of_block: tuple[int | None, ...],
    make_block: Callable[[], HiveCrossAttentionBlock],
    placement: str,
    runtime: HiveRuntime,
) -> HiveInjection:
    """Wrap `layers[i]` for every `i` in `llm_layers`; register a pre-hook on the stack that records the
    cache offset before layer 0 runs and makes the stack's checkpoint function HIVE-aware."""
    injection = HiveInjection(layers=layers, layers_path=layers_path)
    for block_index, (layer_index, level_index) in enumerate(zip(llm_layers, level_of_block)):
        original = layers[layer_index]
        if isinstance(original, HiveDecoderLayer):
            raise ValueError(f"decoder layer {layer_index} at {layers_path} is already wrapped by HIVE")
        injection.originals[layer_index] = original
        layers[layer_index] = HiveDecoderLayer(
            base_layer=original,
            hive_block=make_block(),
            block_index=block_index,
            level_index=level_index,
            placement=placement,
            runtime=runtime,
        )
    if llm_layers:
        stack = find_layer_owner(model, layers)
        injection.stack = stack

        def before_stack_forward(module, args, kwargs):
            runtime.past_length = past_length_of(kwargs.get("past_key_values"))
            function = getattr(module, "_gradient_checkpointing_func", None)
            if function is not None and not hasattr(function, "hive_original"):
                module._gradient_checkpointing_func = hive_aware_checkpoint(function)

        injection.hook_handle = stack.register_forward_pre_hook(before_stack_forward, with_kwargs=True)
    logger.info("HIVE: wrapped decoder layers %s at %s", list(llm_layers), layers_path)
    return injection


def hive_blocks(model: nn.Module) -> list[HiveDecoderLayer]:
    return [module for module in model.modules() if isinstance(module, HiveDecoderLayer)]
