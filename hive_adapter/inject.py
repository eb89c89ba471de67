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


class HiveBlockCall:
    """One HIVE block as a decoder layer runs it: read the runtime's context, mask, maybe checkpoint.

    Shared by the two ways a block reaches a decoder layer: `HiveDecoderLayer` (the layer is wrapped,
    the block is its child) and `attach_hive_hooks` (the layer keeps its class and its parameter names,
    a forward hook runs a block owned elsewhere, e.g. by the LLaVA repo's `mm_projector`). A plain object,
    not a module: it never registers the block a second time.
    """

    def __init__(
        self, *, block: HiveCrossAttentionBlock, block_index: int, level_index: int | None, runtime: HiveRuntime
    ):
        self.block = block
        self.block_index = block_index
        self.level_index = level_index
        self.runtime = runtime
        # Set while a stack-level checkpoint replays the layer (transformers < 4.48): the K/V and masks
        # that went into the checkpoint as explicit inputs.
        self.replay_inputs: tuple[torch.Tensor, ...] | None = None

    def inputs(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """key, value, visible, has_media for this block and a batch of hidden states."""
        context = self.runtime.context_for(hidden)
        key, value = context.key_values(self.block_index, self.level_index, self.block)
        positions = self.runtime.query_positions(hidden.shape[1], hidden.device)
        visible, has_media = context.visibility(positions, self.level_index)
        return key, value, visible, has_media

    def __call__(self, hidden: torch.Tensor, checkpoint: Callable | None = None) -> torch.Tensor:
        """`hidden` plus the gated cross-attention (and FFN) update; `checkpoint`: the layer's checkpoint
        function when it checkpoints, so the block is recomputed in backward too."""
        if self.replay_inputs is not None:
            hidden, _ = self.block(hidden, *self.replay_inputs)
            return hidden
        context = self.runtime.context_for(hidden)
        key, value, visible, has_media = self.inputs(hidden)
        if context.record_attention:
            hidden, weights = self.block(hidden, key, value, visible, has_media, return_weights=True)
            context.attention_maps[self.block_index] = weights.detach()
            return hidden
        if checkpoint is not None:
            # K/V and masks go in as explicit inputs, so reentrant checkpointing routes their gradients too.
            hidden, _ = checkpoint(self.block, hidden, key, value, visible, has_media)
            return hidden
        hidden, _ = self.block(hidden, key, value, visible, has_media)
        return hidden


def _layer_checkpoint(layer: nn.Module) -> Callable | None:
    """The checkpoint function of a layer that checkpoints itself right now (transformers >= 4.48)."""
    if getattr(layer, "gradient_checkpointing", False) and layer.training:
        return getattr(layer, "_gradient_checkpointing_func", None)
    return None


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
        self.placement = placement
        self.hive_call = HiveBlockCall(
            block=hive_block, block_index=block_index, level_index=level_index, runtime=runtime
        )

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

    def apply_hive(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.hive_call(hidden, checkpoint=_layer_checkpoint(self))


def hive_aware_checkpoint(checkpoint_function: Callable) -> Callable:
    """Wrap a decoder stack's `_gradient_checkpointing_func` so HIVE layers checkpoint correctly.

    transformers < 4.48 checkpoints each decoder layer from the stack (`checkpoint(layer.__call__, hidden,
    ...)`). A HIVE layer read inside that call would capture the vision K/V by closure, which reentrant
    checkpointing cannot differentiate (and frozen hidden states make the whole output grad-less). Here
    the K/V and masks are computed first and handed to the checkpoint as explicit inputs.
    """

    def checkpoint_with_hive(function, *args, **kwargs):
        call = getattr(getattr(function, "__self__", None), "hive_call", None)
        if not isinstance(call, HiveBlockCall) or not args:
            return checkpoint_function(function, *args, **kwargs)
        hive_tensors = call.inputs(args[0])
        count = len(args)

        def replay(*all_args):
            call.replay_inputs = all_args[count:]
            try:
                return function(*all_args[:count], **kwargs)
            finally:
                call.replay_inputs = None

        return checkpoint_function(replay, *args, *hive_tensors)

    checkpoint_with_hive.hive_original = checkpoint_function
    return checkpoint_with_hive


@dataclass
class HiveInjection:
    """What `inject_hive` / `attach_hive_hooks` changed, so `remove()` can put it back exactly."""

    layers: nn.ModuleList
    layers_path: str
    originals: dict[int, nn.Module] = field(default_factory=dict)  # wrapped layers, by index
    hooked: dict[int, nn.Module] = field(default_factory=dict)  # layers running a block through hooks
    hook_handles: list[torch.utils.hooks.RemovableHandle] = field(default_factory=list)
    stack: nn.Module | None = None

    def remove(self) -> None:
        for index, original in self.originals.items():
            self.layers[index] = original
        self.originals.clear()
        for layer in self.hooked.values():
            del layer.hive_call
        self.hooked.clear()
        for handle in self.hook_handles:
            handle.remove()
        self.hook_handles.clear()
        wrapped = getattr(self.stack, "_gradient_checkpointing_func", None)
        if wrapped is not None and hasattr(wrapped, "hive_original"):
            self.stack._gradient_checkpointing_func = wrapped.hive_original


def find_layer_owner(root: nn.Module, layers: nn.ModuleList) -> nn.Module:
    """The module whose forward runs `layers` (the decoder stack, e.g. `LlamaModel`)."""
    for module in root.modules():
        if any(child is layers for child in module.children()):
            return module
    raise ValueError("the decoder layer list is not a child of any module in the model")


def _hook_stack(injection: HiveInjection, model: nn.Module, runtime: HiveRuntime) -> None:
    """Pre-hook on the decoder stack: record the cache offset before layer 0 runs and make the stack's
    checkpoint function HIVE-aware (transformers < 4.48 checkpoints layers from the stack)."""
    stack = find_layer_owner(model, injection.layers)
    injection.stack = stack

    def before_stack_forward(module, args, kwargs):
        runtime.past_length = past_length_of(kwargs.get("past_key_values"))
        function = getattr(module, "_gradient_checkpointing_func", None)
        if function is not None and not hasattr(function, "hive_original"):
            module._gradient_checkpointing_func = hive_aware_checkpoint(function)

    def after_stack_forward(module, args, kwargs, output):
        # A training step's context (every level's media and the graph they carry) must not outlive the
        # forward: kept here it would stay alive through backward, the optimizer step and the next batch's
        # vision forward. Nor can anything continue from a forward that returned no cache.
        if runtime.pinned:  # generate() owns the context and clears it itself
            return
        training_step = module.training and torch.is_grad_enabled()
        # tuples (transformers < 4.48, return_dict=False) do not say whether they hold a cache: keep it
        no_cache = not isinstance(output, tuple) and getattr(output, "past_key_values", None) is None
        if training_step or no_cache:
            runtime.set_context(None)

    injection.hook_handles.append(stack.register_forward_pre_hook(before_stack_forward, with_kwargs=True))
    injection.hook_handles.append(stack.register_forward_hook(after_stack_forward, with_kwargs=True))


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
    """Wrap `layers[i]` for every `i` in `llm_layers` (the block becomes the wrapper's child)."""
    injection = HiveInjection(layers=layers, layers_path=layers_path)
    for block_index, (layer_index, level_index) in enumerate(zip(llm_layers, level_of_block, strict=True)):
        original = layers[layer_index]
        if isinstance(original, HiveDecoderLayer) or hasattr(original, "hive_call"):
            raise ValueError(f"decoder layer {layer_index} at {layers_path} already runs a HIVE block")
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
        _hook_stack(injection, model, runtime)
    logger.info("HIVE: wrapped decoder layers %s at %s", list(llm_layers), layers_path)
    return injection


def _hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _run_block_before(layer: nn.Module, args: tuple, kwargs: dict):
    hidden = layer.hive_call(_hidden_of(args, kwargs), checkpoint=_layer_checkpoint(layer))
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _run_block_after(layer: nn.Module, args: tuple, kwargs: dict, output):
    checkpoint = _layer_checkpoint(layer)
    if isinstance(output, tuple):  # transformers < 4.48 returns (hidden_states, ...)
        return (layer.hive_call(output[0], checkpoint=checkpoint), *output[1:])
    return layer.hive_call(output, checkpoint=checkpoint)


def attach_hive_hooks(
    *,
    model: nn.Module,
    layers: nn.ModuleList,
    layers_path: str,
    llm_layers: tuple[int, ...],
    level_of_block: tuple[int | None, ...],
    blocks: list[HiveCrossAttentionBlock],
    placement: str,
    runtime: HiveRuntime,
) -> HiveInjection:
    """Run `blocks[k]` in decoder layer `llm_layers[k]` through forward hooks instead of wrapping it.

    The layers keep their class and their parameter names, so checkpoints of the base model load
    unchanged, and the blocks stay wherever their owner registered them (the LLaVA integration keeps
    them under `model.mm_projector`, where LLaVA's own saving, freezing and LoRA exclusion find them).
    Under layer-level checkpointing (transformers >= 4.48) the hooks run outside the checkpoint and
    checkpoint the block themselves; under stack-level checkpointing (< 4.48) `hive_aware_checkpoint`
    hands the block's K/V to the checkpoint as explicit inputs.
    """
    if len(blocks) != len(llm_layers):
        raise ValueError(f"{len(blocks)} HIVE blocks for {len(llm_layers)} decoder layers {list(llm_layers)}")
    injection = HiveInjection(layers=layers, layers_path=layers_path)
    for block_index, (layer_index, level_index) in enumerate(zip(llm_layers, level_of_block, strict=True)):
        layer = layers[layer_index]
        if isinstance(layer, HiveDecoderLayer) or hasattr(layer, "hive_call"):
            raise ValueError(f"decoder layer {layer_index} at {layers_path} already runs a HIVE block")
        layer.hive_call = HiveBlockCall(
            block=blocks[block_index], block_index=block_index, level_index=level_index, runtime=runtime
        )
        injection.hooked[layer_index] = layer
        if placement == "before":
            handle = layer.register_forward_pre_hook(_run_block_before, with_kwargs=True)
        else:
            handle = layer.register_forward_hook(_run_block_after, with_kwargs=True)
        injection.hook_handles.append(handle)
    if llm_layers:
        _hook_stack(injection, model, runtime)
    logger.info("HIVE: cross-attention hooked into decoder layers %s at %s", list(llm_layers), layers_path)
    return injection


def hive_blocks(model: nn.Module) -> list[HiveDecoderLayer]:
    return [module for module in model.modules() if isinstance(module, HiveDecoderLayer)]
