"""`HiveRuntime`: the one owner of HIVE's per-prompt state, and the only code that changes it.

Why state at all: transformers 4.37 hands nothing but its own arguments to decoder layers, and 5.x hands
its `**kwargs` on into attention, so "pass it as an argument" does not reach a hooked layer on every version
the library supports. Instead each HIVE model owns one runtime; its blocks read the current context from it.

The lifecycle, in the runtime's verbs (every front end uses these, nothing else touches the state):

    forward(prompt)      continues_prompt(...) decides: a new prompt (its context is built and becomes
                         current through begin_prompt, cached K/V dropped) or a decoding step (the
                         current one is kept); context_for_call does both
      decoder stack      begin_stack(past_length): the cache offset, read before layer 0 runs
      each HIVE block    context_for(hidden), query_positions(...), cached_key_values / keep_key_values,
                         record (while recording_attention)
      end of the stack   end_forward(...): a training step's or cache-less forward's context is dropped
    generate(prompt)     generating(context, run): the context is pinned for every forward of `run`,
                         then cleared; analysis pins a plain forward the same way (`pinned_to`)
    analysis             recording_attention(): the attention maps of the forwards inside it
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch

from .context import HiveVisionContext

T = TypeVar("T")


class HiveRuntime:
    """The current vision context, the decoding offset, the per-prompt K/V cache and recorded attention."""

    def __init__(self) -> None:
        self._context: HiveVisionContext | None = None
        self._pinned = False  # True while generate() (or an analysis) owns the context
        self.past_length = 0  # tokens already in the LM's KV cache when the current forward began
        self._key_values: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # (block, batch) -> K/V
        self._attention: dict[int, torch.Tensor] | None = None  # block -> weights, while recording

    # ------------------------------------------------------------------ reading
    @property
    def context(self) -> HiveVisionContext | None:
        return self._context

    @property
    def pinned(self) -> bool:
        return self._pinned

    @property
    def recording(self) -> bool:
        return self._attention is not None

    def context_for(self, hidden: torch.Tensor) -> HiveVisionContext:
        """The current context for a block's batch of hidden states (expanded for beams)."""
        if self._context is None:
            raise RuntimeError(
                "a HIVE-hooked decoder layer ran without a vision context. Call the HIVE model (HiveModel or "
                "HiveForConditionalGeneration) rather than the base model it wraps, or use hive_model.generate()."
            )
        return self._context.for_batch(hidden.shape[0])

    def query_positions(self, length: int, device: torch.device) -> torch.Tensor:
        return torch.arange(self.past_length, self.past_length + length, device=device)

    def cached_vision_bytes(self) -> int:
        """Bytes of the K/V the blocks keep for the current prompt (what generation caches besides the LM)."""
        return sum(t.numel() * t.element_size() for pair in self._key_values.values() for t in pair)

    # ------------------------------------------------------------------ the decision
    def continues_prompt(self, *, past_length: int, has_images: bool) -> bool:
        """Whether a forward call continues the current prompt (inside `generate`, or a decoding step: the cache
        holds tokens and no images came) rather than starting a new one. The one place this is decided."""
        if self._pinned:
            return True
        if past_length > 0 and not has_images:
            if self._context is None:
                raise RuntimeError("a decoding step (past_key_values given) arrived before any prompt was seen")
            return True
        return False

    def context_for_call(
        self, *, past_length: int, has_images: bool, build: Callable[[], HiveVisionContext]
    ) -> HiveVisionContext:
        """The context a forward call uses: the current one when the call continues the prompt, else a new
        prompt's, built now and made current."""
        if self.continues_prompt(past_length=past_length, has_images=has_images):
            return self._context
        return self.begin_prompt(build())

    # ------------------------------------------------------------------ verbs
    def begin_prompt(self, context: HiveVisionContext) -> HiveVisionContext:
        """`context` is the current prompt's; K/V cached for an earlier prompt go."""
        self._context = context
        self._key_values.clear()
        return context

    def begin_stack(self, past_length: int) -> None:
        """The decoder stack starts: the cache offset, read before layer 0 runs (inside later layers the cache
        already holds the current step for earlier layers)."""
        self.past_length = past_length

    def end_forward(self, *, training_step: bool, returned_cache: bool) -> None:
        """The decoder stack ended. A training step's context (every level's media and the graph they carry)
        must not outlive the forward, nor can anything continue from a forward that returned no cache."""
        if self._pinned:
            return
        if training_step or not returned_cache:
            self.clear()
        elif torch.is_grad_enabled() and self._context is not None:
            # An eval-mode forward with gradients on that returned a cache: the prompt may be continued, but its
            # graph (the tower's activations the projectors' backward would read) must go with the output.
            self._context = self._context.detached()
            self._key_values.clear()

    @property
    def caching_key_values(self) -> bool:
        """Blocks keep their K/V for the prompt's next steps only where nothing trains (no gradients)."""
        return not torch.is_grad_enabled()

    def cached_key_values(self, block_index: int, batch: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A block's K/V from an earlier step of the same prompt (generation), or None."""
        return self._key_values.get((block_index, batch)) if self.caching_key_values else None

    def keep_key_values(self, block_index: int, batch: int, key_value: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Keep a block's K/V for the next decoding steps of this prompt."""
        if self.caching_key_values:
            self._key_values[(block_index, batch)] = key_value

    def record(self, block_index: int, weights: torch.Tensor) -> None:
        if self._attention is not None:
            self._attention[block_index] = weights.detach()

    @contextmanager
    def recording_attention(self) -> Iterator[dict[int, torch.Tensor]]:
        """Inside: every HIVE block records its attention weights (block index -> (batch, heads, text, keys))."""
        self._attention = {}
        try:
            yield self._attention
        finally:
            self._attention = None

    @contextmanager
    def pinned_to(self, context: HiveVisionContext) -> Iterator[HiveVisionContext]:
        """Every forward inside uses `context` (no call replaces it); the state is cleared afterwards."""
        self.clear()
        self.begin_prompt(context)
        self._pinned = True
        try:
            yield context
        finally:
            self.clear()

    def generating(self, context: HiveVisionContext, run: Callable[[], T]) -> T:
        """One `generate()`: the prompt's context (vision tower and block K/V run once) pinned for every step."""
        with self.pinned_to(context):
            return run()

    def clear(self) -> None:
        self._context = None
        self._pinned = False
        self.past_length = 0
        self._key_values.clear()


def past_length_of(past_key_values: object) -> int:
    """Tokens already in a KV cache: a `Cache` object (4.36+) or the legacy tuple of tuples."""
    if past_key_values is None:
        return 0
    if hasattr(past_key_values, "get_seq_length"):
        return int(past_key_values.get_seq_length())
    if isinstance(past_key_values, (tuple, list)) and past_key_values and past_key_values[0] is not None:
        return int(past_key_values[0][0].shape[-2])
    return 0
