"""LLaVA's `<image>` markers taken out of a padded batch: HIVE's images never enter the token sequence.

LLaVA's `tokenizer_image_token` puts `IMAGE_TOKEN_INDEX` where each image goes; the HIVE connector drops those
columns and remembers where they stood (the text after a marker sees its image through cross-attention).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...data.collator import IGNORE_INDEX

# llava.constants: the id `tokenizer_image_token` puts where "<image>" stood (`apply_patch` checks LLaVA agrees).
IMAGE_TOKEN_INDEX = -200


@dataclass
class TextWithoutMarkers:
    """A batch with its `<image>` markers taken out, and where they stood (see `drop_image_markers`)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None
    position_ids: torch.Tensor | None
    marker_positions: torch.Tensor  # (batch, max markers): the column each marker stood at
    marker_counts: torch.Tensor  # (batch,)


def drop_image_markers(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    *,
    padding_side: str,
) -> TextWithoutMarkers:
    """Remove every IMAGE_TOKEN_INDEX from a padded batch, keeping rows padded on `padding_side`.

    The markers are moved to the padding side (masked out, label ignored) and as many columns as every
    row can spare are cut. `marker_positions` (batch, max markers) is the column where each marker
    stood, i.e. where the text after it now starts; tokens at or after it see the image.
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side={padding_side!r}: expected 'right' or 'left'")
    batch, length = input_ids.shape
    markers = input_ids == IMAGE_TOKEN_INDEX  # (batch, text)
    counts = markers.sum(dim=1)  # (batch,)
    keep = ~markers
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
    # Stable sort: text keeps its order, markers go to the padding side.
    sort_key = markers if padding_side == "right" else keep
    order = torch.sort(sort_key.to(torch.int8), dim=1, stable=True).indices  # (batch, text)
    moved = torch.gather(markers, 1, order)
    ids = torch.gather(input_ids, 1, order).masked_fill(moved, 0)
    mask = torch.gather(attention_mask, 1, order).masked_fill(moved, 0)
    new_labels = None if labels is None else torch.gather(labels, 1, order).masked_fill(moved, IGNORE_INDEX)

    # Column of each marker in the new layout: text before it (plus the markers moved in front, left side).
    text_before = torch.cumsum(keep.long(), dim=1)  # inclusive; at a marker == exclusive
    offset = counts[:, None] if padding_side == "left" else 0
    columns = torch.where(markers, text_before + offset, torch.full_like(text_before, length + 1))
    slots = max(1, int(counts.max())) if batch else 1
    marker_positions = columns.sort(dim=1).values[:, :slots]  # (batch, slots); `length + 1` where no marker

    spare = int(counts.min()) if batch else 0  # columns that hold a marker in every row
    if spare:
        if padding_side == "right":
            ids, mask = ids[:, : length - spare], mask[:, : length - spare]
            new_labels = None if new_labels is None else new_labels[:, : length - spare]
        else:
            ids, mask = ids[:, spare:], mask[:, spare:]
            new_labels = None if new_labels is None else new_labels[:, spare:]
            marker_positions = marker_positions - spare
    new_positions = None
    if position_ids is not None:
        new_positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0).to(position_ids.dtype)
    return TextWithoutMarkers(
        input_ids=ids,
        attention_mask=mask,
        labels=new_labels,
        position_ids=new_positions,
        marker_positions=marker_positions,
        marker_counts=counts,
    )
