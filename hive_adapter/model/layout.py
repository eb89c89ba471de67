"""Which image each sample sees, and from which column on: the image markers of a batch turned into slots.

Flamingo's media locations, one rule for every front end: images are taken in marker order, row-major over
the batch; a sample's slot `k` holds its `k`-th image and remembers the column of that image's marker. The
Hugging Face front ends read the markers from `input_ids` (or find them in `inputs_embeds`); the LLaVA
integration drops LLaVA's markers from the sequence first and, as LLaVA does, lets a sample without a
marker consume one (blank) image that nobody sees.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ImageSlots:
    """image_index, image_valid, marker_positions: each (batch, slots). A slot's image, whether the slot is
    real (padding slots copy some image and are masked out), and the column its marker stands at."""

    image_index: torch.Tensor
    image_valid: torch.Tensor
    marker_positions: torch.Tensor

    def without(self, usable: torch.Tensor | None) -> ImageSlots:
        """These slots with the images that are not `usable` (images,) seen by nobody. `usable` lives where the
        pixels arrived (often the CPU), the slots where the text is (the model's device)."""
        if usable is None:
            return self
        usable = usable.to(self.image_index.device)
        return ImageSlots(self.image_index, self.image_valid & usable[self.image_index], self.marker_positions)


def no_images(batch: int, device: torch.device) -> ImageSlots:
    """One slot per sample that nobody sees (a batch without images still runs every HIVE module)."""
    zeros = torch.zeros(batch, 1, dtype=torch.long, device=device)
    return ImageSlots(zeros, torch.zeros(batch, 1, dtype=torch.bool, device=device), zeros)


def one_image_per_sample(batch: int, num_images: int, device: torch.device) -> ImageSlots:
    """Captioning (no marker token): image `b` for sample `b`, seen by every token."""
    if num_images != batch:
        raise ValueError(
            f"pixel_values holds {num_images} images for a batch of {batch} samples. Without an image marker "
            "token (image_token_id=None) HIVE pairs exactly one image with each sample; set "
            "HiveConfig(image_token_id=...) to place several images per sample."
        )
    index = torch.arange(batch, device=device)[:, None]
    return ImageSlots(index, torch.ones(batch, 1, dtype=torch.bool, device=device), torch.zeros_like(index))


def images_by_marker(
    counts: torch.Tensor,
    marker_positions: torch.Tensor,
    num_images: int,
    *,
    unmarked_takes_one: bool = False,
    mismatch: str,
) -> ImageSlots:
    """Images in marker order: `counts` (batch,) markers per sample, `marker_positions` (batch, slots) their
    columns. With `unmarked_takes_one` a sample without a marker consumes one image that nobody sees (LLaVA's
    blank image for a text-only sample). `mismatch`: what to say when the counts and the images disagree."""
    consumed = counts.clamp(min=1) if unmarked_takes_one else counts
    if int(consumed.sum()) != num_images:
        raise ValueError(mismatch.format(markers=int(counts.sum()), images=num_images, per_sample=counts.tolist()))
    slots = marker_positions.shape[1]
    slot = torch.arange(slots, device=counts.device)
    first = consumed.cumsum(0) - consumed  # (batch,) index of each sample's first image
    image_index = (first[:, None] + slot).clamp(max=max(num_images - 1, 0))  # (batch, slots)
    return ImageSlots(image_index, slot < counts[:, None], marker_positions)


def marker_slots(markers: torch.Tensor, num_images: int, *, image_token_id: int | None) -> ImageSlots:
    """Slots from a (batch, text) marker mask: the Hugging Face front ends."""
    batch, length = markers.shape
    device = markers.device
    if device.type == "meta":
        # No data on `meta` (FLOP counting): assume the images are spread evenly over the batch.
        slots = max(1, math.ceil(num_images / batch))
        index = torch.arange(batch * slots, device=device).view(batch, slots).clamp(max=max(num_images - 1, 0))
        return ImageSlots(index, torch.ones(batch, slots, dtype=torch.bool, device=device), index * 0)
    counts = markers.sum(dim=1)  # (batch,)
    refuse_expanded_placeholders(markers, num_images, image_token_id=image_token_id)
    slots = max(1, int(counts.max()))
    columns = torch.where(
        markers, torch.arange(length, device=device), torch.full_like(markers, length, dtype=torch.long)
    )
    marker_positions = columns.sort(dim=1).values[:, :slots]  # (batch, slots); `length` where no marker
    return images_by_marker(
        counts,
        marker_positions,
        num_images,
        mismatch=f"the batch has {{markers}} image marker tokens (id {image_token_id}) but pixel_values holds "
        "{images} images; per sample: {per_sample} markers. Put one marker where each image goes (with "
        "inputs_embeds alone, a marker is a row equal to the marker token's embedding; or pass input_ids alongside).",
    )


def refuse_expanded_placeholders(markers: torch.Tensor, num_images: int, *, image_token_id: int | None) -> None:
    """A family processor (Qwen-VL, LLaVA-NeXT, Idefics3, ...) expands each image into a run of placeholder tokens;
    read as markers, N placeholders would be N images. More markers than images, standing in runs of consecutive
    markers, is that form: refused by name. (As many markers as images can only be one marker per image.)"""
    count = int(markers.sum())
    if count <= num_images:
        return
    starts = markers.clone()
    starts[:, 1:] &= ~markers[:, :-1]  # (batch, text) the first marker of each run
    runs = int(starts.sum())
    if runs == count:
        return
    raise ValueError(
        f"the batch has {count} image marker tokens (id {image_token_id}) in {runs} runs of consecutive markers for "
        f"{num_images} images: that is a family processor's expanded form (a run of placeholders per image), and HIVE "
        "reads one marker per image. Build the inputs with HiveProcessor.from_processor(processor), which writes one "
        "marker per image, or collapse each run to one marker."
    )


def find_markers(
    marker: int | None,
    input_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    *,
    embedding_table: Callable[[], torch.Tensor],
) -> torch.Tensor | None:
    """(batch, text) True where an image marker stands; None without a marker token (captioning).

    From `input_ids` when given; from `inputs_embeds` alone, a marker is a row equal to the marker token's
    row of the input embedding table (`embedding_table()`, read only then), as llava-hf finds its image tokens.
    """
    if marker is None:
        return None
    if input_ids is not None:
        return input_ids == marker
    if inputs_embeds is None:
        raise ValueError("pass input_ids or inputs_embeds")
    table = embedding_table()
    if table.numel() == 0:  # partitioned (ZeRO-3): nothing to compare against
        raise ValueError(
            "inputs_embeds alone: the image markers cannot be found while the embedding table is partitioned "
            "(ZeRO-3); pass input_ids alongside inputs_embeds (the markers are read from them)"
        )
    return (inputs_embeds == table[marker].to(inputs_embeds.dtype)).all(dim=-1)


def image_token_id_from_tokenizer(tokenizer, image_token: str = "<image>") -> int:
    """The id of the image marker in `tokenizer` (what `HiveConfig(image_token_id=...)` takes in marker mode).

    Args:
        tokenizer (`PreTrainedTokenizerBase`): a transformers tokenizer.
        image_token (`str`, defaults to `"<image>"`): the marker's text.

    Returns:
        `int`: the marker's token id.

    Raises:
        ValueError: the tokenizer has no such single token; the message says how to add it
            (`tokenizer.add_tokens`, then `resize_token_embeddings`).
    """
    vocab = tokenizer.get_vocab()
    if image_token not in vocab:
        raise ValueError(
            f"the tokenizer has no {image_token!r} token: add it with tokenizer.add_tokens([{image_token!r}], "
            "special_tokens=True) and resize the model's embeddings (model.resize_token_embeddings(len(tokenizer)))"
        )
    return vocab[image_token]
