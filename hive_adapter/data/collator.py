"""Batching for HIVE pre-training: tokenise prompt + caption, learn the caption, process the images.

Text is truncated to 77 tokens by default (supplementary §7, SigLIP's text length). The loss is on the
caption only; the prompt and padding are `-100`. HIVE's default pre-training is pure captioning: no
image marker in the text, every token sees its sample's image. With `image_token` set, the marker is
put in front of the prompt (and the model must know its id).

With `packing_length` the samples of a batch are packed (`pack_rows`): several per row, position ids
restarting at each, no attention mask (`hive_adapter.model.packing`), the images in the order the samples stand.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from ..model.splice import IGNORE_INDEX  # defined by the core (splice.py); the collators label "no loss here" with it
from ..utils.distributed import is_main_process

logger = logging.getLogger(__name__)


def with_pad_token(tokenizer):
    """Batches need a pad token; LMs without one (Llama, Vicuna) pad with unk, as LLaVA does, else with eos."""
    if tokenizer.pad_token is None:
        replacement = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
        if replacement is None:
            raise ValueError("the tokenizer has no pad, unk or eos token to pad batches with; set tokenizer.pad_token")
        tokenizer.pad_token = replacement
        if is_main_process():  # every rank pads the same way; one of them says so
            logger.warning("the tokenizer has no pad token: padding with %r (masked out of the loss)", replacement)
    return tokenizer


def pack_rows(
    encoded: list[tuple[list[int], list[int]]], *, capacity: int, pad_token_id: int
) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Pack samples ((ids, labels) each) into rows of at most `capacity` tokens, first-fit decreasing (the
    longest first, each into the first row with room; deterministic). Returns input_ids, labels and position_ids
    (restarting at 0 at every sample; no attention mask: transformers then keeps the samples apart), and the
    order the samples stand in, row by row. A sample's first label is `IGNORE_INDEX`: the token before it belongs
    to another sample (a padded row never predicts its first token either). Rows are padded to the longest by
    continuing their last sample's positions: under causal attention no real token sees that padding."""
    longest = max(len(ids) for ids, _ in encoded)
    if capacity < longest:
        raise ValueError(
            f"packing_length={capacity}: the longest sample has {longest} tokens; give --packing_length at least "
            "--max_text_length"
        )
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0])):  # stable: ties keep their order
        size = len(encoded[index][0])
        row = next((r for r, free in enumerate(room) if free >= size), None)
        if row is None:
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        rows[row].append(index)
        room[row] -= size
    width = max(capacity - free for free in room)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for row, members in enumerate(rows):
        column = 0
        for index in members:
            ids, target = encoded[index]
            input_ids[row, column : column + len(ids)] = torch.tensor(ids)
            labels[row, column + 1 : column + len(ids)] = torch.tensor(target[1 : len(ids)], dtype=torch.long)
            position_ids[row, column : column + len(ids)] = torch.arange(len(ids))
            last, column = len(ids), column + len(ids)
        position_ids[row, column:] = torch.arange(last, last + width - column)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}, [i for r in rows for i in r]


def pad_rows(encoded: list[tuple[list[int], list[int]]], *, pad_token_id: int) -> dict[str, torch.Tensor]:
    """One sample ((ids, labels)) per row, right-padded to the longest: input_ids, attention_mask, labels."""
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, (ids, target) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(target)] = torch.tensor(target)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def text_rows(
    encoded: list[tuple[list[int], list[int]]], *, pad_token_id: int, packing_length: int | None
) -> tuple[dict[str, torch.Tensor], list[int]]:
    """The batch's text, padded (`pad_rows`) or, with `packing_length`, packed (`pack_rows`), and the order the
    samples stand in (their images go in that order). Both collators batch their text here."""
    if packing_length is None:
        return pad_rows(encoded, pad_token_id=pad_token_id), list(range(len(encoded)))
    return pack_rows(encoded, capacity=packing_length, pad_token_id=pad_token_id)


def check_packing_length(packing_length: int | None, max_length: int) -> None:
    """A packed row must hold any sample: `packing_length` (when packing) is at least `max_length`."""
    if packing_length is not None and packing_length < max_length:
        raise ValueError(
            f"packing_length={packing_length}: shorter than max_length={max_length} (a sample may have that many "
            "tokens); give --packing_length at least --max_text_length"
        )


@dataclass
class HiveCaptionCollator:
    tokenizer: Any
    image_processor: Any
    max_length: int = 77
    image_token: str | None = None
    packing_length: int | None = None  # pack the batch's samples into rows of this many tokens (None: pad)

    def __post_init__(self) -> None:
        if self.tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to its eos token)")
        if self.max_length < 2:
            raise ValueError(f"max_length={self.max_length}: need room for at least one caption token")
        check_packing_length(self.packing_length, self.max_length)

    def encode(self, prompt: str, caption: str) -> tuple[list[int], list[int]]:
        """Token ids and labels of one sample (BOS + [marker] + prompt + caption + EOS, truncated)."""
        tokenizer = self.tokenizer
        prefix = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        if self.image_token is not None:
            prefix += tokenizer.convert_tokens_to_ids([self.image_token])
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        caption_ids = tokenizer(caption, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            caption_ids = caption_ids + [tokenizer.eos_token_id]
        ids = (prefix + prompt_ids + caption_ids)[: self.max_length]
        labels = ([IGNORE_INDEX] * (len(prefix) + len(prompt_ids)) + caption_ids)[: self.max_length]
        return ids, labels

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        encoded = [self.encode(s.get("prompt", ""), s["caption"]) for s in samples]
        batch, order = text_rows(encoded, pad_token_id=self.tokenizer.pad_token_id, packing_length=self.packing_length)
        return {**batch, **self.pixels([samples[i] for i in order])}

    def pixels(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        """The samples' images, processed, in their order: `pixel_values` and whatever else the image processor
        says the model takes (Qwen-VL's `image_grid_thw`, Idefics3's `pixel_attention_mask`, ...). Non-finite
        pixels are an error naming the image."""
        processed = self.image_processor(images=[s["image"] for s in samples], return_tensors="pt")
        names = dict.fromkeys(["pixel_values", *getattr(self.image_processor, "model_input_names", ())])
        inputs = {name: processed[name] for name in names if name in processed}
        finite = image_is_finite(inputs, len(samples))
        if not bool(finite.all()):
            bad = [samples[i].get("source", f"sample {i} of the batch") for i in (~finite).nonzero().flatten().tolist()]
            raise ValueError(
                f"{', '.join(bad)}: NaN or inf pixel values after preprocessing; check the image and the image "
                "processor's image_mean / image_std (a std of 0 divides by zero). Training stops rather than make "
                "every gradient NaN."
            )
        return inputs


def image_is_finite(inputs: dict[str, torch.Tensor], images: int) -> torch.Tensor:
    """(images,) whether each image's pixels are all finite: a row of `pixel_values` per image, or packed patch
    rows grouped by `image_grid_thw` (Qwen-VL), or (another packing) one verdict for the whole batch."""
    pixels = inputs["pixel_values"]
    finite_rows = torch.isfinite(pixels.flatten(1)).all(dim=1)  # (rows,)
    if pixels.shape[0] == images:
        return finite_rows
    grid = inputs.get("image_grid_thw")
    if grid is not None and int(grid.prod(dim=-1).sum()) == pixels.shape[0]:
        return torch.stack([rows.all() for rows in finite_rows.split(grid.prod(dim=-1).tolist())])
    return finite_rows.all().expand(images)
