"""The vision context of one batch of prompts: the projected levels laid out per sample, where each image's
marker stands, and which keys each text column may see. Prompt data only; the state that changes from call
to call (which context is current, the decoding offset, cached K/V, recorded attention) is the runtime's
(`hive_adapter.model.runtime`).

Masking follows Flamingo's media locations, with the leaks peers shipped (Idefics, Mllama) ruled out:
a text token at column `p` sees image `m` of its sample only if that image's marker stands at or
before `p`; `"previous"` keeps only the latest such image, `"all_previous"` all of them. Tokens that see
no image get exactly zero from every HIVE block. Generated tokens (past the prompt) see what the
prompt's last token sees: a generated marker id is text, there is no image behind it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from .layout import ImageSlots
from .packing import PackedLayout


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
    # Packed rows (`hive_adapter.model.packing`): this context is laid out per *sample*, as for padded rows, and
    # `packed` says where each sample stands in the rows; blocks gather a sample's tokens, attend, scatter back.
    packed: PackedLayout | None = None
    _expanded: dict[int, HiveVisionContext] = field(default_factory=dict, repr=False)  # for_batch's memo
    _all_visible: dict[tuple[int, int], bool] = field(default_factory=dict, repr=False)  # all_visible's memo

    @classmethod
    def from_images(
        cls,
        levels: list[torch.Tensor],
        token_mask: torch.Tensor | None,
        slots: ImageSlots,
        *,
        prompt_length: int,
        media_attention: str,
    ) -> HiveVisionContext:
        """Lay projected images out per sample.

        levels: each (images, tokens, hidden), as the level encoder returns them; token_mask: (images,
        tokens) real patches or None; slots: which image fills each sample's slot (`hive_adapter.model.layout`).
        """
        image_index = slots.image_index
        batch_size, count = image_index.shape
        tokens = levels[0].shape[1]
        # Padding slots hold a copy of some image; they are zeroed (selected, not multiplied), so that a
        # non-finite image never reaches another sample through keys it cannot see (0 x NaN is NaN).
        real = slots.image_valid.repeat_interleave(tokens, dim=1)[..., None]  # (batch, slots*tokens, 1)
        laid_out = [
            torch.where(real, level[image_index.flatten()].reshape(batch_size, count * tokens, -1), level.new_zeros(()))
            for level in levels
        ]  # each (batch, slots*tokens, hidden)
        token_valid = None
        if token_mask is not None:
            token_valid = token_mask[image_index.flatten()].reshape(batch_size, count * tokens)
        return cls(
            levels=laid_out,
            image_valid=slots.image_valid,
            marker_positions=slots.marker_positions,
            tokens_per_image=tokens,
            prompt_length=prompt_length,
            token_valid=token_valid,
            media_attention=media_attention,
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
        if self.packed is not None:
            raise ValueError(
                f"a HIVE layer got a batch of {batch_size} rows for a packed context of {self.batch_size} samples: "
                "packed rows are for training and are never expanded (beams, several sequences per prompt)"
            )
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
            )
        return self._expanded[batch_size]

    def detached(self) -> HiveVisionContext:
        """This context without the autograd graph that built it (the same values, for later decoding steps)."""
        return dataclasses.replace(
            self, levels=[level.detach() for level in self.levels], _expanded={}, _all_visible={}
        )

    def media(self, level_index: int | None) -> torch.Tensor:
        """Keys/values input of a block: one level, or all levels side by side (`level_mapping="all"`)."""
        if level_index is None:
            return torch.cat(self.levels, dim=1)  # (batch, levels*images*tokens, hidden)
        return self.levels[level_index]

    def all_visible(self, visible: torch.Tensor, start: int) -> bool | None:
        """Whether every query column (`start`, the first one's position, on) sees every key (captioning): read once
        per forward (one host sync, shared by every block; the answer does not depend on the level). None on `meta`,
        where there is nothing to read."""
        if visible.device.type == "meta":
            return None
        key = (start, visible.shape[1], visible.shape[0])
        if key not in self._all_visible:
            self._all_visible[key] = bool(visible.all())
        return self._all_visible[key]

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
            # The latest *usable* image at or before the query: slots need not be a prefix of usable images (an
            # image left out for NaN pixels is a hole), so take the largest seen index, not the count of seen ones.
            image_index = torch.arange(seen.shape[-1], device=seen.device)
            latest = torch.where(seen, image_index, -1).amax(dim=-1, keepdim=True)  # (batch, text, 1); -1: none
            seen = seen & (image_index == latest)
        visible = seen.repeat_interleave(self.tokens_per_image, dim=-1)  # (batch, text, images*tokens)
        if self.token_valid is not None:
            visible = visible & self.token_valid[:, None, :]
        if level_index is None:
            visible = visible.repeat(1, 1, len(self.levels))  # (batch, text, levels*images*tokens)
        return visible, has_media
