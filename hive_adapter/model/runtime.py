"""`HiveRuntime`: the one owner of HIVE's per-prompt state, and the only code that changes it.

Why state at all: transformers 4.37 hands nothing but its own arguments to decoder layers, and 5.x hands
its `**kwargs` on into attention, so "pass it as an argument" does not reach a hooked layer on every version
the library supports. Instead each HIVE model owns one runtime; its blocks read the current prompt from it.

A prompt's state (`HivePrompt`: its vision context and the K/V its blocks computed) is current only inside an
explicit scope, and released when the scope exits, however it exits (docs/ARCHITECTURE.md §4):

    forward              prompt_for_call(...) decides: a decoding step continues the prompt of the cache it
                         passes, anything else is a new prompt (built by the caller);
                         `with forward_scope(prompt):` the language model runs; on exit nothing is current
      decoder stack      begin_stack(past_length): the cache offset, read before layer 0 runs
      each HIVE block    context_for(hidden), query_positions(...), cached_key_values / keep_key_values,
                         record (while recording_attention)
      end of the stack   end_stack(...): a returned cache (not a training step's) carries the prompt for its
                         decoding steps, for as long as the cache lives; with gradients on, without the graph
    generate(prompt)     `with pinned_to(context):` (or generating): one prompt for every step, released at
                         the end; analysis pins a plain forward the same way
    analysis             recording_attention(): the attention maps of the forwards inside it

The LLaVA integration cannot wrap LLaVA's forward: its `prepare_inputs` opens the scope (`open_forward`) and the
hook after the decoder stack closes it, also when the stack raises (`always_call`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from .context import HiveVisionContext

T = TypeVar("T")


@dataclass(eq=False)
class HivePrompt:
    """One prompt's state: its vision context and the K/V each block computed from it ((block, batch) -> K/V,
    kept only where no gradients flow, so that decoding steps do not recompute them)."""

    context: HiveVisionContext
    key_values: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def continuable(self) -> HivePrompt:
        """What a returned cache may carry: with gradients on, the context without the autograd graph that built
        it (the graph goes with the forward's output) and no K/V."""
        if torch.is_grad_enabled():
            return HivePrompt(self.context.detached())
        return self


class HiveRuntime:
    """The current prompt (inside a scope), the decoding offset, the prompts caches carry, recorded attention."""

    def __init__(self) -> None:
        self._prompt: HivePrompt | None = None  # current inside a scope only
        self._pinned = False  # True while generate() (or an analysis) owns the prompt
        self._closes_at_stack_end = False  # a scope opened by open_forward (LLaVA), closed by end_stack
        self._past_length = 0  # tokens already in the LM's KV cache when the current forward began
        # id(cache key) -> (weak reference to the key, the prompt that cache continues): see `_remember`
        self._continued: dict[int, tuple[weakref.ref, HivePrompt]] = {}
        self._attention: dict[int, torch.Tensor] | None = None  # block -> weights, while recording

    # ------------------------------------------------------------------ reading
    @property
    def context(self) -> HiveVisionContext | None:
        """The current prompt's context: None outside a scope."""
        return None if self._prompt is None else self._prompt.context

    @property
    def pinned(self) -> bool:
        return self._pinned

    @property
    def past_length(self) -> int:
        return self._past_length

    @property
    def recording(self) -> bool:
        return self._attention is not None

    def context_for(self, hidden: torch.Tensor) -> HiveVisionContext:
        """The current context for a block's batch of hidden states (expanded for beams)."""
        if self._prompt is None:
            raise RuntimeError(
                "a HIVE-hooked decoder layer ran without a vision context. Call the HIVE model (HiveModel or "
                "HiveForConditionalGeneration) rather than the base model it wraps, or use hive_model.generate()."
            )
        return self._prompt.context.for_batch(hidden.shape[0])

    def query_positions(self, length: int, device: torch.device) -> torch.Tensor:
        return torch.arange(self._past_length, self._past_length + length, device=device)

    def cached_vision_bytes(self, past_key_values: Any = None) -> int:
        """Bytes of the K/V the blocks keep for a prompt (what generation caches besides the LM): the prompt
        `past_key_values` continues, or the current one."""
        prompt = self._prompt if past_key_values is None else self._continued_by(past_key_values)
        if prompt is None:
            return 0
        return sum(t.numel() * t.element_size() for pair in prompt.key_values.values() for t in pair)

    # ------------------------------------------------------------------ the decision
    def prompt_for_call(self, *, past_key_values: Any, has_images: bool) -> HivePrompt | None:
        """The prompt a forward call continues: the pinned one (inside `generate` or an analysis), or, for a
        decoding step (the cache holds tokens, no images came), the one its cache carries. None: a new prompt,
        which the caller builds. The one place this is decided."""
        if self._pinned:
            return self._prompt
        if past_length_of(past_key_values) > 0 and not has_images:
            prompt = self._continued_by(past_key_values)
            if prompt is None:
                raise RuntimeError(
                    "a decoding step (past_key_values given) arrived before any prompt was seen: pass the cache a "
                    "forward of this HIVE model returned for the prompt (with use_cache=True), or use generate()"
                )
            return prompt
        return None

    # ------------------------------------------------------------------ scopes
    @contextmanager
    def forward_scope(self, prompt: HivePrompt | HiveVisionContext) -> Iterator[HiveVisionContext]:
        """One forward call: `prompt` (a continued prompt, or a new prompt's context) is current inside and
        released on exit, whatever the mode and however the call ends. Inside `pinned_to` the pinned prompt
        stays current and the pin's owner releases it."""
        if self._pinned:
            yield self._prompt.context
            return
        self._open(prompt)
        try:
            yield self._prompt.context
        finally:
            self._close()

    def open_forward(self, prompt: HivePrompt | HiveVisionContext) -> None:
        """`forward_scope` for a front end that cannot wrap the forward (LLaVA's `prepare_inputs`): the scope
        is closed by the hook after the decoder stack (`end_stack`), which runs even when the stack raises."""
        if self._pinned:
            return
        self._open(prompt)
        self._closes_at_stack_end = True

    @contextmanager
    def pinned_to(self, context: HiveVisionContext) -> Iterator[HiveVisionContext]:
        """Every forward inside uses `context` (no call replaces it: `generate`'s decoding steps, an analysis's
        forward); released on exit, however the block ends."""
        self._open(context)
        self._pinned = True
        try:
            yield context
        finally:
            self._close()

    def generating(self, context: HiveVisionContext, run: Callable[[], T]) -> T:
        """One `generate()`: the prompt's context (vision tower and block K/V run once) pinned for every step."""
        with self.pinned_to(context):
            return run()

    def _open(self, prompt: HivePrompt | HiveVisionContext) -> None:
        self._prompt = prompt if isinstance(prompt, HivePrompt) else HivePrompt(prompt)
        self._past_length = 0

    def _close(self) -> None:
        self._prompt = None
        self._pinned = False
        self._closes_at_stack_end = False
        self._past_length = 0

    # ------------------------------------------------------------------ the decoder stack
    def begin_stack(self, past_length: int) -> None:
        """The decoder stack starts: the cache offset, read before layer 0 runs (inside later layers the cache
        already holds the current step for earlier layers)."""
        self._past_length = past_length

    def end_stack(self, *, training_step: bool, returned_cache: Any) -> None:
        """The decoder stack ended (`returned_cache` None: it returned none, or raised). A returned cache carries
        the prompt for its decoding steps, for as long as the cache lives; a training step's never does (its
        context and graph must not outlive the step)."""
        if self._pinned or self._prompt is None:
            return
        if returned_cache is not None and not training_step:
            self._remember(returned_cache, self._prompt.continuable())
        if self._closes_at_stack_end:
            self._close()

    # ------------------------------------------------------------------ prompts carried by caches
    def _remember(self, cache: Any, prompt: HivePrompt) -> None:
        """`cache` continues `prompt` while it lives. Held by a weak reference to the cache (or, for the legacy
        tuple of tuples, to its first key tensor, which each step replaces), so dropping the cache releases the
        prompt; nothing is searched by identity."""
        key = cache_key(cache)
        if key is None:
            return  # a cache of unknown form: a decoding step with it is refused by name
        ident = id(key)
        runtime = weakref.ref(self)

        def forget(ref: weakref.ref) -> None:
            owner = runtime()
            if owner is not None and owner._continued.get(ident, (None,))[0] is ref:
                del owner._continued[ident]

        self._continued[ident] = (weakref.ref(key, forget), prompt)

    def _continued_by(self, cache: Any) -> HivePrompt | None:
        key = cache_key(cache)
        entry = self._continued.get(id(key)) if key is not None else None
        return entry[1] if entry is not None and entry[0]() is key else None

    # ------------------------------------------------------------------ blocks
    @property
    def caching_key_values(self) -> bool:
        """Blocks keep their K/V for the prompt's next steps only where nothing trains (no gradients)."""
        return not torch.is_grad_enabled()

    def cached_key_values(self, block_index: int, batch: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A block's K/V from an earlier step of the same prompt (generation), or None."""
        if self._prompt is None or not self.caching_key_values:
            return None
        return self._prompt.key_values.get((block_index, batch))

    def keep_key_values(self, block_index: int, batch: int, key_value: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Keep a block's K/V for the next decoding steps of this prompt."""
        if self._prompt is not None and self.caching_key_values:
            self._prompt.key_values[(block_index, batch)] = key_value

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

    def clear(self) -> None:
        """Forget everything: the current prompt and the prompts caches carry (their decoding steps are refused)."""
        self._close()
        self._continued.clear()


def cache_key(cache: Any) -> object | None:
    """What identifies a KV cache across the decoding steps of one prompt: a `Cache` object (updated in place),
    or the first key tensor of the legacy tuple of tuples (each step returns new tuples)."""
    if hasattr(cache, "get_seq_length"):
        return cache
    if isinstance(cache, (tuple, list)) and cache and isinstance(cache[0], (tuple, list)) and cache[0]:
        first = cache[0][0]
        return first if isinstance(first, torch.Tensor) else None
    return None


def returned_cache_of(output: Any) -> Any:
    """The KV cache a decoder stack returned: `output.past_key_values`, or, for a tuple output (transformers <
    4.48 with return_dict=False), its element that is a cache; None when it returned none (or raised)."""
    if output is None:
        return None
    if not isinstance(output, tuple):
        return getattr(output, "past_key_values", None)
    return next((item for item in output[1:] if cache_key(item) is not None), None)


def past_length_of(past_key_values: object) -> int:
    """Tokens already in a KV cache: a `Cache` object (4.36+) or the legacy tuple of tuples."""
    if past_key_values is None:
        return 0
    if hasattr(past_key_values, "get_seq_length"):
        return int(past_key_values.get_seq_length())
    if isinstance(past_key_values, (tuple, list)) and past_key_values and past_key_values[0] is not None:
        return int(past_key_values[0][0].shape[-2])
    return 0
