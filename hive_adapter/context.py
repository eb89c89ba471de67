"""The per-prompt vision context that wrapped decoder layers read, and the object that owns it.

Why state at all: transformers 4.37 hands nothing but its own arguments to decoder layers, and 5.x
hands its `**kwargs` on into attention, so "pass it as an argument" does not reach a wrapped layer on
every version the library supports. Instead one `HiveRuntime` per model owns the current
`HiveVisionContext`; the HIVE model's forward (or `generate`) replaces it for every new prompt, and it
stays until the next one so that gradient checkpointing's recompute and every decoding step see it.

Masking follows Flamingo's media locations, with the leaks peers shipped (Idefics, Mllama) ruled out:
a text token at column `p` sees image `m` of its sample only if that image's marker stands at or
before `p`; `"previous"` keeps only the latest such image, `"all_previous"` all of them. Tokens that see
no image get exactly zero from every HIVE block. Generated tokens (past the prompt) see what the
prompt's last token sees: a generated marker id is text, there is no image behind it.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


@dataclass
class HiveVisionContext:
    """Projected vision levels of one batch of prompts, laid out per sample, plus where each image sits.

    `levels[i]`: (batch, images_per_sample * tokens, hidden): level `i` of every image of a sample,
    image-major and padded to the batch's largest image count; `image_valid` (batch, images_per_sample)
    marks the real ones; `marker_positions` (batch, images_per_sample) the column of each image's marker;
    `token_valid` (batch, images_per_sample * tokens), where present, the real (non-padding) patches.
    """

    levels: list[torch.Tensor]
    image_valid: torch.Tensor
    marker_positions: torch.Tensor
    tokens_per_image: int
    prompt_length: int
    token_valid: torch.Tensor | None = None
    media_attention: str = "previous"
    cache_key_values: bool = False
    record_attention: bool = False
    attention_maps: dict[int, torch.Tensor] = field(default_factory=dict)
    _key_values: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)
    _expanded: dict[int, HiveVisionContext] = field(default_factory=dict, repr=False)

    @classmethod
    def from_images(
        cls,
        levels: list[torch.Tensor],
        token_mask: torch.Tensor | None,
        *,
        image_index: torch.Tensor,
        image_valid: torch.Tensor,
        marker_positions: torch.Tensor,
        prompt_length: int,
        media_attention: str,
    ) -> HiveVisionContext:
        """Lay projected images out per sample.

        levels: each (images, tokens, hidden), as the level encoder returns them; token_mask: (images,
        tokens) real patches or None; image_index / image_valid / marker_positions: (batch, slots), which
        image fills each sample's slot, whether the slot is real, and the column its marker stands at.
        """
        batch_size, slots = image_index.shape
        tokens = levels[0].shape[1]
        # Padding slots hold a copy of some image; they are zeroed (selected, not multiplied), so that a
        # non-finite image never reaches another sample through keys it cannot see (0 x NaN is NaN).
        real = image_valid.repeat_interleave(tokens, dim=1)[..., None]  # (batch, slots*tokens, 1)
        laid_out = [
            torch.where(real, level[image_index.flatten()].reshape(batch_size, slots * tokens, -1), level.new_zeros(()))
            for level in levels
        ]  # each (batch, slots*tokens, hidden)
        token_valid = None
        if token_mask is not None:
            token_valid = token_mask[image_index.flatten()].reshape(batch_size, slots * tokens)
        return cls(
            levels=laid_out,
            image_valid=image_valid,
            marker_positions=marker_positions,
            tokens_per_image=tokens,
            prompt_length=prompt_length,
            token_valid=token_valid,
            media_attention=media_attention,
            cache_key_values=not torch.is_grad_enabled(),
        )

    @property
    def batch_size(self) -> int:
        return self.image_valid.shape[0]

    def for_batch(self, batch_size: int) -> HiveVisionContext:
        """This context for a batch that `generate` expanded (beams, several sequences per prompt).

        transformers expands inputs with `repeat_interleave`, so sample `b` becomes rows
        `b*k ... b*k+k-1`. Beam reordering only permutes rows within one sample's group, and those rows
        share the same image and prompt, so the expanded context never needs reordering.
        """
        if batch_size == self.batch_size:
            return self
        if batch_size % self.batch_size:
            raise ValueError(
                f"a HIVE layer got a batch of {batch_size} rows, but the vision context holds {self.batch_size} "
                "prompts; pass pixel_values for this batch"
            )
        if batch_size not in self._expanded:
            k = batch_size // self.batch_size
            self._expanded[batch_size] = HiveVisionContext(
                levels=[level.repeat_interleave(k, dim=0) for level in self.levels],
                image_valid=self.image_valid.repeat_interleave(k, dim=0),
                marker_positions=self.marker_positions.repeat_interleave(k, dim=0),
                tokens_per_image=self.tokens_per_image,
                prompt_length=self.prompt_length,
                token_valid=None if self.token_valid is None else self.token_valid.repeat_interleave(k, dim=0),
                media_attention=self.media_attention,
                cache_key_values=self.cache_key_values,
                record_attention=self.record_attention,
                attention_maps=self.attention_maps,
            )
        return self._expanded[batch_size]

    def media(self, level_index: int | None) -> torch.Tensor:
        """Keys/values input of a block: one level, or all levels side by side (`level_mapping="all"`)."""
        if level_index is None:
            return torch.cat(self.levels, dim=1)  # (batch, levels*images*tokens, hidden)
        return self.levels[level_index]

    def cached_key_values(self, block_index: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A block's K/V from an earlier step of the same prompt (generation), or None."""
        return self._key_values.get(block_index) if self.cache_key_values else None

    def keep_key_values(self, block_index: int, key_value: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Keep a block's K/V for the next decoding steps (only when generating: nothing trains)."""
        if self.cache_key_values:
            self._key_values[block_index] = key_value

    def visibility(self, positions: torch.Tensor, level_index: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Which keys each query column may see.

        positions: (text,) absolute columns of the queries. Returns `visible` (batch, text, keys) and
        `has_media` (batch, text).
        """
        # Generated columns (>= prompt_length) see what the end of the prompt sees; a marker that was dropped
        # from the end of a prompt (LLaVA integration) stands at column `prompt_length`.
        columns = positions.clamp(max=self.prompt_length)
        # (batch, text, images): the image's marker stands at or before the query
        seen = (self.marker_positions[:, None, :] <= columns[None, :, None]) & self.image_valid[:, None, :]
        has_media = seen.any(dim=-1)
        if self.media_attention == "previous":
            latest = seen.sum(dim=-1, keepdim=True) - 1  # index of the latest image at or before the query
            image_index = torch.arange(seen.shape[-1], device=seen.device)
            seen = seen & (image_index == latest)
        visible = seen.repeat_interleave(self.tokens_per_image, dim=-1)  # (batch, text, images*tokens)
        if self.token_valid is not None:
            visible = visible & self.token_valid[:, None, :]
        if level_index is None:
            visible = visible.repeat(1, 1, len(self.levels))  # (batch, text, levels*images*tokens)
        return visible, has_media


class HiveRuntime:
    """Named owner of HIVE's per-prompt state: the current context and the decoding offset.

    `past_length` is read from the cache by a pre-hook on the decoder stack *before* layer 0 runs
    (inside later layers the cache already holds the current step for earlier layers).
    """

    def __init__(self) -> None:
        self.context: HiveVisionContext | None = None
        self.past_length = 0
        self.pinned = False  # True while generate() owns the context: forward calls must not replace it

    def set_context(self, context: HiveVisionContext | None) -> None:
        self.context = context

    def clear(self) -> None:
        self.context = None
        self.past_length = 0
        self.pinned = False

    @contextmanager
    def generation(self, context: HiveVisionContext):
        """Hold `context` for every forward call of one `generate()`; cleared afterwards."""
        self.context, self.pinned = context, True
        try:
            yield context
        finally:
            self.clear()

    def context_for(self, hidden: torch.Tensor) -> HiveVisionContext:
        if self.context is None:
            raise RuntimeError(
                "a HIVE-wrapped decoder layer ran without a vision context. Call the HIVE model (HiveModel or "
                "HiveForConditionalGeneration) rather than the base model it wraps, or use hive_model.generate()."
            )
        return self.context.for_batch(hidden.shape[0])

    def query_positions(self, length: int, device: torch.device) -> torch.Tensor:
        return torch.arange(self.past_length, self.past_length + length, device=device)


def past_length_of(past_key_values: object) -> int:
    """Tokens already in a KV cache: a `Cache` object (4.36+) or the legacy tuple of tuples."""
    if past_key_values is None:
        return 0
    if hasattr(past_key_values, "get_seq_length"):
        return int(past_key_values.get_seq_length())
    if isinstance(past_key_values, (tuple, list)) and past_key_values and past_key_values[0] is not None:
        return int(past_key_values[0][0].shape[-2])
    return 0
