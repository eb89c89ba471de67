"""Run HIVE blocks inside chosen decoder layers of any HF language model, through forward hooks.

The decoder layers are neither wrapped nor re-classed: each chosen layer gets a forward pre-hook
(`placement="before"`) or forward hook (`"after"`) that adds its block's gated cross-attention to the
hidden states, and the blocks live wherever their owner registered them (`hive_blocks` of a HIVE model,
`mm_projector.hive_blocks` in the LLaVA integration). So the language model keeps its class, its
parameter names and its checkpoints; PEFT finds no foreign module with a `base_layer`; and removal is
taking the hooks off again. The hooks are small callable objects found by their type, never closures,
so `copy.deepcopy` of a model copies them along with the modules they belong to.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .runtime import HiveRuntime, past_length_of, returned_cache_of

logger = logging.getLogger(__name__)


class HiveBlockCall:
    """One HIVE block as a decoder layer runs it: read the runtime's context, mask, maybe checkpoint.

    A plain object, not a module: it never registers the block a second time.
    """

    def __init__(
        self,
        *,
        block: Callable[[], nn.Module],
        block_index: int,
        level_index: int | None,
        runtime: HiveRuntime,
    ):
        self._block = block
        self.block_index = block_index
        self.level_index = level_index
        self.runtime = runtime
        # Set while a stack-level checkpoint replays the layer (transformers < 4.48): the media and masks
        # that went into the checkpoint as explicit inputs.
        self.replay_inputs: tuple[torch.Tensor, ...] | None = None

    @property
    def block(self) -> nn.Module:
        """What the block's owner holds in its place right now (looked up on every call): PEFT's
        `modules_to_save` puts a wrapper there whose trainable copy must be the one that runs."""
        return self._block()

    def inputs(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """media, visible, has_media for this block and a batch of hidden states, on the hidden states' device (with
        a multi-GPU `device_map` the context lives where the prompt was read, the layer maybe elsewhere)."""
        context = self.runtime.context_for(hidden)
        positions = self.runtime.query_positions(hidden.shape[1], context.image_valid.device)
        visible, has_media = context.visibility(positions, self.level_index)
        device = hidden.device
        return context.media(self.level_index).to(device), visible.to(device), has_media.to(device)

    def __call__(self, hidden: torch.Tensor, checkpoint: Callable | None = None) -> torch.Tensor:
        """`hidden` plus the gated cross-attention (and FFN) update; `checkpoint`: the layer's checkpoint
        function when it checkpoints, so the block is recomputed in backward too. Packed rows: each sample's
        tokens are gathered into a row of their own, run as a padded batch would be, and scattered back, so a
        token's cross-attention costs what it costs unpacked and reads only its own sample's images."""
        context = self.runtime.context
        packed = context.packed if context is not None and self.replay_inputs is None else None
        if packed is not None:
            return packed.scatter(self.run(packed.gather(hidden), checkpoint))
        return self.run(hidden, checkpoint)

    def run(self, hidden: torch.Tensor, checkpoint: Callable | None) -> torch.Tensor:
        if self.replay_inputs is not None:
            hidden, _, _ = self.block(hidden, *self.replay_inputs)
            return hidden
        runtime = self.runtime
        media, visible, has_media = self.inputs(hidden)
        if checkpoint is not None and not runtime.recording:
            # The media and masks go in as explicit inputs, so reentrant checkpointing routes their gradients.
            hidden, _, _ = checkpoint(self.block, hidden, media, visible, has_media)
            return hidden
        hidden, weights, key_value = self.block(
            hidden,
            media,
            visible,
            has_media,
            key_value=runtime.cached_key_values(self.block_index, hidden.shape[0]),
            return_weights=runtime.recording,
            return_key_value=runtime.caching_key_values,
            all_visible=runtime.context_for(hidden).all_visible(visible, runtime.past_length),
        )
        if key_value is not None:
            runtime.keep_key_values(self.block_index, hidden.shape[0], key_value)
        if weights is not None:
            runtime.record(self.block_index, weights)
        return hidden


def _layer_checkpoint(layer: nn.Module) -> Callable | None:
    """The checkpoint function of a layer that checkpoints itself right now (transformers >= 4.48)."""
    if getattr(layer, "gradient_checkpointing", False) and layer.training:
        return getattr(layer, "_gradient_checkpointing_func", None)
    return None


class HiveBeforeLayer:
    """Forward pre-hook: the block runs on the layer's input hidden states (`placement="before"`)."""

    def __init__(self, call: HiveBlockCall):
        self.call = call

    def __call__(self, layer: nn.Module, args: tuple, kwargs: dict):
        if args:
            return (self.call(args[0], checkpoint=_layer_checkpoint(layer)), *args[1:]), kwargs
        hidden = self.call(kwargs["hidden_states"], checkpoint=_layer_checkpoint(layer))
        return args, {**kwargs, "hidden_states": hidden}


class HiveAfterLayer:
    """Forward hook: the block runs on the layer's output hidden states (`placement="after"`)."""

    def __init__(self, call: HiveBlockCall):
        self.call = call

    def __call__(self, layer: nn.Module, args: tuple, kwargs: dict, output):
        checkpoint = _layer_checkpoint(layer)
        if isinstance(output, tuple):  # transformers < 4.48 returns (hidden_states, ...)
            return (self.call(output[0], checkpoint=checkpoint), *output[1:])
        return self.call(output, checkpoint=checkpoint)


class HiveStackStart:
    """Pre-hook on the decoder stack: record the cache offset before layer 0 runs (inside later layers the
    cache already holds the current step for earlier layers) and make the stack's checkpoint function
    HIVE-aware (transformers < 4.48 checkpoints layers from the stack)."""

    def __init__(self, runtime: HiveRuntime):
        self.runtime = runtime

    def __call__(self, stack: nn.Module, args: tuple, kwargs: dict):
        self.runtime.begin_stack(past_length_of(kwargs.get("past_key_values")))
        function = getattr(stack, "_gradient_checkpointing_func", None)
        if function is not None and not hasattr(function, "hive_original"):
            stack._gradient_checkpointing_func = hive_aware_checkpoint(function)


class HiveStackEnd:
    """Hook after the decoder stack, run also when the stack raises (`always_call`): tells the runtime the stack
    ended and which cache it returned (`HiveRuntime.end_stack`: a returned cache carries the prompt on; a scope
    the LLaVA integration opened closes here)."""

    def __init__(self, runtime: HiveRuntime):
        self.runtime = runtime

    def __call__(self, stack: nn.Module, args: tuple, kwargs: dict, output):
        self.runtime.end_stack(
            training_step=stack.training and torch.is_grad_enabled(), returned_cache=returned_cache_of(output)
        )


LAYER_HOOKS = (HiveBeforeLayer, HiveAfterLayer)
STACK_HOOKS = (HiveStackStart, HiveStackEnd)


def hive_hooks_of(module: nn.Module, types: tuple[type, ...]) -> list[tuple[dict, int]]:
    """(hook dict, key) of every HIVE hook of `types` on `module`."""
    found = []
    for hooks in (module._forward_pre_hooks, module._forward_hooks):
        found += [(hooks, key) for key, hook in hooks.items() if isinstance(hook, types)]
    return found


def _remove_hive_hooks(module: nn.Module, types: tuple[type, ...]) -> None:
    """Take HIVE's hooks of `types` off `module`, with the flags torch keeps beside them (as a handle would)."""
    for hooks, key in hive_hooks_of(module, types):
        del hooks[key]
        for flags in (module._forward_pre_hooks_with_kwargs, module._forward_hooks_with_kwargs):
            flags.pop(key, None)


def hive_call_of(layer: nn.Module) -> HiveBlockCall | None:
    """The HIVE block a decoder layer runs, or None."""
    for hooks, key in hive_hooks_of(layer, LAYER_HOOKS):
        return hooks[key].call
    return None


def hive_aware_checkpoint(checkpoint_function: Callable) -> Callable:
    """Wrap a decoder stack's `_gradient_checkpointing_func` so HIVE layers checkpoint correctly.

    transformers < 4.48 checkpoints each decoder layer from the stack (`checkpoint(layer.__call__, hidden,
    ...)`). A HIVE block run inside that call would capture the vision features by closure, which reentrant
    checkpointing cannot differentiate (and frozen hidden states make the whole output grad-less). Here
    the media and masks are taken first and handed to the checkpoint as explicit inputs.
    """

    def checkpoint_with_hive(function, *args, **kwargs):
        layer = getattr(function, "__self__", None)
        call = hive_call_of(layer) if isinstance(layer, nn.Module) else None
        if call is None or not args:
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
class HiveAttachment:
    """Where `attach_hive_hooks` put its hooks, so `remove()` can take them off again."""

    layers: nn.ModuleList
    layers_path: str
    llm_layers: tuple[int, ...]
    stack: nn.Module | None = None

    def remove(self) -> None:
        for module in (*self.layers, *([self.stack] if self.stack is not None else [])):
            _remove_hive_hooks(module, (*LAYER_HOOKS, *STACK_HOOKS))
        wrapped = getattr(self.stack, "_gradient_checkpointing_func", None)
        if wrapped is not None and hasattr(wrapped, "hive_original"):
            self.stack._gradient_checkpointing_func = wrapped.hive_original


def find_layer_owner(root: nn.Module, layers: nn.ModuleList) -> nn.Module:
    """The module whose forward runs `layers` (the decoder stack, e.g. `LlamaModel`)."""
    for module in root.modules():
        if any(child is layers for child in module.children()):
            return module
    raise ValueError("the decoder layer list is not a child of any module in the model")


def attach_hive_hooks(
    *,
    model: nn.Module,
    layers: nn.ModuleList,
    layers_path: str,
    llm_layers: tuple[int, ...],
    level_of_block: tuple[int | None, ...],
    blocks: nn.ModuleDict,
    placement: str,
    runtime: HiveRuntime,
) -> HiveAttachment:
    """Run `blocks[str(layer)]` in decoder layer `layer` of `model`, for each layer of `llm_layers`. `blocks` is
    the owner's `hive_blocks`, keyed by decoder layer on every front end; it is looked up on every call, so a
    module put in a block's place later (PEFT's `ModulesToSaveWrapper`) is the one that runs.

    Under layer-level checkpointing (transformers >= 4.48) the hooks run outside the checkpoint and
    checkpoint the block themselves; under stack-level checkpointing (< 4.48) `hive_aware_checkpoint`
    hands the block's media and masks to the checkpoint as explicit inputs.
    """
    if list(blocks) != [str(index) for index in llm_layers]:
        raise ValueError(
            f"HIVE blocks {list(blocks)} for decoder layers {list(llm_layers)}: one per layer, by its index"
        )
    for layer_index in llm_layers:
        if hive_call_of(layers[layer_index]) is not None:
            raise ValueError(f"decoder layer {layer_index} at {layers_path} already runs a HIVE block")
    attachment = HiveAttachment(layers=layers, layers_path=layers_path, llm_layers=tuple(llm_layers))
    for block_index, (layer_index, level_index) in enumerate(zip(llm_layers, level_of_block, strict=True)):
        block = functools.partial(blocks.__getitem__, str(layer_index))
        call = HiveBlockCall(block=block, block_index=block_index, level_index=level_index, runtime=runtime)
        if placement == "before":
            layers[layer_index].register_forward_pre_hook(HiveBeforeLayer(call), with_kwargs=True)
        else:
            layers[layer_index].register_forward_hook(HiveAfterLayer(call), with_kwargs=True)
    if llm_layers:
        stack = find_layer_owner(model, layers)
        stack.register_forward_pre_hook(HiveStackStart(runtime), with_kwargs=True)
        stack.register_forward_hook(HiveStackEnd(runtime), with_kwargs=True, always_call=True)
        attachment.stack = stack
    logger.info("HIVE: cross-attention hooked into decoder layers %s at %s", list(llm_layers), layers_path)
    return attachment
