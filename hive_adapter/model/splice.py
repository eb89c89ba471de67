"""The self-attention baseline's data flow (`connector="concat"`): image tokens spliced into the sequence at
their markers, as LLaVA does, with masks and labels padded to one length.
"""

from __future__ import annotations

import torch

# Label of a position the loss skips (PyTorch's cross-entropy default; LLaVA's and transformers' too). The
# collators re-export it; the core defines it so that it imports nothing from the training side.
IGNORE_INDEX = -100


def splice_image_tokens(
    *,
    markers: torch.Tensor | None,
    embeddings: torch.Tensor,
    images: torch.Tensor | list[torch.Tensor],
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    padding_side: str = "right",
    return_positions: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Replace each marker by its image's tokens (LLaVA's splice) and pad the rows to one length
    (`"right"` for training, `"left"` for generation).

    With `return_positions`, a fourth tensor, (batch, text): where each input column landed in the spliced
    sequence; a marker's column points at its image's last token, whose hidden state predicts the text after
    the image (as the marker's own would without splicing). Columns of padding point at some spliced position.

    markers: (batch, text) True where a marker stands; None (no marker token): each sample's single image
    goes in front of its text. embeddings: (batch, text, hidden); images: (images, tokens, hidden), or a list of
    (tokens_i, hidden) when images have different token counts (NaFlex grids pooled to their own size).
    """
    batch, length = embeddings.shape[:2]
    if embeddings.device.type == "meta":
        if return_positions:
            raise ValueError("return_positions: no positions on the meta device")
        return _splice_on_meta(embeddings, images, attention_mask, labels, batch=batch, tokens=images.shape[1])
    if attention_mask is None:
        attention_mask = torch.ones(batch, length, dtype=torch.long, device=embeddings.device)
    rows_embeds, rows_mask, rows_labels, rows_positions = [], [], [], []
    next_image = 0
    for b in range(batch):
        if markers is None:
            positions = [-1]  # "marker" in front of the text, nothing to drop
        else:
            positions = markers[b].nonzero().flatten().tolist()
        pieces_e, pieces_m, pieces_l = [], [], []
        landed = []  # per input column, its index in this row of the spliced sequence
        start = 0
        for position in positions:
            if next_image >= len(images):
                raise ValueError(
                    f"the batch has more image markers than the {len(images)} images in pixel_values; put one "
                    "marker where each image goes"
                )
            image = images[next_image]
            tokens = image.shape[0]
            next_image += 1
            cut = max(position, 0)
            if return_positions:
                offset = sum(piece.shape[0] for piece in pieces_e) - start  # spliced index minus input index
                landed.append(torch.arange(start, cut) + offset)
                if position >= 0:  # the marker's column: its image's last token
                    landed.append(torch.tensor([cut + offset + tokens - 1]))
            pieces_e += [embeddings[b, start:cut], image]
            pieces_m += [attention_mask[b, start:cut], attention_mask.new_ones(tokens)]
            if labels is not None:
                pieces_l += [labels[b, start:cut], labels.new_full((tokens,), IGNORE_INDEX)]
            start = position + 1
        if return_positions:
            offset = sum(piece.shape[0] for piece in pieces_e) - start
            landed.append(torch.arange(start, length) + offset)
            rows_positions.append(torch.cat(landed))
        pieces_e.append(embeddings[b, start:])
        pieces_m.append(attention_mask[b, start:])
        if labels is not None:
            pieces_l.append(labels[b, start:])
        rows_embeds.append(torch.cat(pieces_e))
        rows_mask.append(torch.cat(pieces_m))
        if labels is not None:
            rows_labels.append(torch.cat(pieces_l))
    if next_image != len(images):
        raise ValueError(
            f"the batch has {next_image} image markers but pixel_values holds {len(images)} images; put one "
            "marker where each image goes"
        )
    width = max(row.shape[0] for row in rows_embeds)
    out_embeds = embeddings.new_zeros(batch, width, embeddings.shape[-1])
    out_mask = attention_mask.new_zeros(batch, width)
    out_labels = labels.new_full((batch, width), IGNORE_INDEX) if labels is not None else None
    out_positions = torch.empty(batch, length, dtype=torch.long) if return_positions else None
    for b in range(batch):
        n = rows_embeds[b].shape[0]
        span = slice(0, n) if padding_side == "right" else slice(width - n, width)
        out_embeds[b, span] = rows_embeds[b]
        out_mask[b, span] = rows_mask[b]
        if out_labels is not None:
            out_labels[b, span] = rows_labels[b]
        if out_positions is not None:
            out_positions[b] = rows_positions[b] + span.start
    if out_positions is not None:
        return out_embeds, out_mask, out_labels, out_positions.to(embeddings.device)
    return out_embeds, out_mask, out_labels


def _splice_on_meta(embeddings, images, attention_mask, labels, *, batch: int, tokens: int):
    """No data on `meta` (FLOP counting): the images, spread evenly over the batch, replace as many
    columns in front of each sample's text; shapes and costs are those of the real splice."""
    per_sample = max(1, images.shape[0] // batch)
    laid_out = images[: batch * per_sample].reshape(batch, per_sample * tokens, -1)  # (batch, images*tokens, hidden)
    out_embeds = torch.cat([laid_out.to(embeddings.dtype), embeddings[:, per_sample:]], dim=1)
    if attention_mask is None:
        attention_mask = embeddings.new_ones(batch, embeddings.shape[1], dtype=torch.long)
    if attention_mask.ndim == 4:  # a ready 4-D mask for the spliced length (what meta FLOP counting passes)
        out_mask = attention_mask
    else:
        out_mask = torch.cat(
            [attention_mask.new_ones(batch, per_sample * tokens), attention_mask[:, per_sample:]], dim=1
        )
    out_labels = None
    if labels is not None:
        out_labels = torch.cat(
            [labels.new_full((batch, per_sample * tokens), IGNORE_INDEX), labels[:, per_sample:]], dim=1
        )
    return out_embeds, out_mask, out_labels


def splice_packed(
    *,
    markers: torch.Tensor | None,
    segments: torch.Tensor,
    embeddings: torch.Tensor,
    images: torch.Tensor | list[torch.Tensor],
    labels: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`splice_image_tokens` for packed rows (`hive_adapter.model.packing`): each image's tokens go inside its own
    sample, at its marker or (no marker token) in front of the sample's text, and the position ids restart at
    every sample, image tokens included. Rows are padded to one length by continuing their last sample (causal
    attention: no real token sees the padding), with `IGNORE_INDEX` labels. Returns embeddings, position ids,
    labels."""
    batch, length = embeddings.shape[:2]
    rows_embeds, rows_labels, rows_positions = [], [], []
    next_image = 0
    for b in range(batch):
        bounds = (torch.diff(segments[b], prepend=segments[b, :1] - 1) != 0).nonzero().flatten().tolist()
        pieces_e, pieces_l, pieces_p = [], [], []
        for start, end in zip(bounds, [*bounds[1:], length], strict=True):
            if markers is None:
                cuts = [(start, start)]  # the sample's image in front of its text, nothing dropped
            else:
                cuts = [(p, p + 1) for p in (markers[b, start:end].nonzero().flatten() + start).tolist()]
            sample_e, sample_l, begin = [], [], start
            for cut, resume in cuts:
                if next_image >= len(images):
                    raise ValueError(
                        f"the packed batch has more images to place than the {len(images)} in pixel_values; put one "
                        "marker where each image goes (without a marker token: one image per sample)"
                    )
                image = images[next_image]
                next_image += 1
                sample_e += [embeddings[b, begin:cut], image]
                if labels is not None:
                    sample_l += [labels[b, begin:cut], labels.new_full((image.shape[0],), IGNORE_INDEX)]
                begin = resume
            sample_e.append(embeddings[b, begin:end])
            if labels is not None:
                sample_l.append(labels[b, begin:end])
            sample = torch.cat(sample_e)
            pieces_e.append(sample)
            pieces_l += sample_l
            pieces_p.append(torch.arange(sample.shape[0], device=embeddings.device))
        rows_embeds.append(torch.cat(pieces_e))
        rows_positions.append(pieces_p)
        if labels is not None:
            rows_labels.append(torch.cat(pieces_l))
    if next_image != len(images):
        raise ValueError(
            f"the packed batch places {next_image} images but pixel_values holds {len(images)}; put one marker where "
            "each image goes (without a marker token: one image per sample)"
        )
    width = max(row.shape[0] for row in rows_embeds)
    out_embeds = embeddings.new_zeros(batch, width, embeddings.shape[-1])
    out_positions = torch.zeros(batch, width, dtype=torch.long, device=embeddings.device)
    out_labels = labels.new_full((batch, width), IGNORE_INDEX) if labels is not None else None
    for b in range(batch):
        n = rows_embeds[b].shape[0]
        out_embeds[b, :n] = rows_embeds[b]
        last = rows_positions[b][-1]
        tail = torch.arange(last.shape[0], last.shape[0] + width - n, device=embeddings.device)
        out_positions[b] = torch.cat([*rows_positions[b], tail])
        if out_labels is not None:
            out_labels[b, :n] = rows_labels[b]
    return out_embeds, out_positions, out_labels
