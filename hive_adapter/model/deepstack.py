"""DeepStack's data flow (`connector="deepstack"`, Qwen3-VL): shallower vision levels added to the hidden states
of the first decoder layers, at the positions of the image tokens spliced into the sequence.

Qwen3-VL splices its deepest vision features into the sequence as image tokens (as `concat` does), projects a few
intermediate encoder layers (`deepstack_visual_indexes`) with mergers of their own, and after decoder layer k adds
the k-th of them to the hidden states at the image tokens' positions. Here each such level is spliced exactly as
the deepest one, into zeros (`splice_image_tokens` / `splice_packed`): an addition that is zero at every text
column and the level's tokens at every image column, of the spliced sequence's shape. Forward hooks add it after
decoder layer k while the language model runs on a prompt from its first column (a forward, the first step of
`generate`, every step without a cache); decoding steps after a cached prompt add nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .runtime import past_length_of


class _PromptStart:
    """Pre-hook on the decoder stack: whether this call runs the prompt from its first column (no cache before)."""

    def __init__(self):
        self.from_start = False

    def __call__(self, stack: nn.Module, args: tuple, kwargs: dict):
        self.from_start = past_length_of(kwargs.get("past_key_values")) == 0


class _AddLevel:
    """Forward hook on decoder layer k: its output plus the k-th level's addition at the image columns."""

    def __init__(self, addition: torch.Tensor, start: _PromptStart, layer_index: int):
        self.addition = addition  # (batch, spliced length, hidden)
        self.start = start
        self.layer_index = layer_index
        self.applied = 0

    def __call__(self, layer: nn.Module, args: tuple, kwargs: dict, output):
        if not self.start.from_start:
            return output  # a decoding step after a cached prompt: the images are in the cache already
        hidden = output[0] if isinstance(output, tuple) else output  # transformers < 4.48 returns a tuple
        batch, length = self.addition.shape[:2]
        if hidden.shape[1] < length or hidden.shape[0] % batch:
            raise ValueError(
                f"connector='deepstack': decoder layer {self.layer_index} ran a prompt of shape "
                f"{tuple(hidden.shape[:2])}, the spliced prompt is ({batch}, {length}); pass the prompt whole"
            )
        # (batch, length, hidden) -> the rows `generate` expanded (beams, several sequences: each prompt repeated)
        addition = self.addition.repeat_interleave(hidden.shape[0] // batch, 0).to(hidden.dtype)
        if hidden.shape[1] > length:  # without a cache, `generate` re-runs the prompt and the tokens after it
            addition = F.pad(addition, (0, 0, 0, hidden.shape[1] - length))  # zeros after the prompt
        self.applied += 1
        hidden = hidden + addition
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def check_checkpointing(stack: nn.Module, layers: nn.ModuleList) -> None:
    """Refuse stack-level gradient checkpointing (transformers < 4.48): the stack replays each layer in backward,
    after the additions' hooks are gone, and the shallower levels' projectors would get no gradient."""
    stack_checkpoints = getattr(stack, "gradient_checkpointing", False) and stack.training
    if stack_checkpoints and not getattr(layers[0], "gradient_checkpointing", False):
        raise ValueError(
            "connector='deepstack' under gradient checkpointing needs transformers >= 4.48 (layers that checkpoint "
            "themselves); upgrade transformers or train without --gradient_checkpointing"
        )


@contextmanager
def added_after_layers(model, additions: list[torch.Tensor]) -> Iterator[None]:
    """While the block runs, decoder layer k of `model` (a HIVE model: `hive_decoder_stack`) adds `additions[k]`
    (batch, spliced length, hidden) to its output whenever the stack runs a prompt from its first column. No
    additions: nothing is hooked. A prompt the hooks never saw is refused when the block ends (the levels would be
    silently missing)."""
    if not additions:
        yield
        return
    stack, layers = model.hive_decoder_stack
    if len(additions) > len(layers):
        raise ValueError(
            f"connector='deepstack': {len(additions)} shallower levels need as many decoder layers, the language "
            f"model has {len(layers)}"
        )
    check_checkpointing(stack, layers)
    start = _PromptStart()
    hooks = [_AddLevel(addition, start, index) for index, addition in enumerate(additions)]
    handles = [stack.register_forward_pre_hook(start, with_kwargs=True)]
    handles += [layers[i].register_forward_hook(hook, with_kwargs=True) for i, hook in enumerate(hooks)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
    missed = [hook.layer_index for hook in hooks if not hook.applied]
    if missed:
        raise RuntimeError(
            f"connector='deepstack': decoder layers {missed} never ran the prompt, so its shallower levels were not "
            "added; this language model runs its layers in a way the hooks do not see"
        )
