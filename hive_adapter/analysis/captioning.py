"""Teacher-forced captioning: logits aligned with the text, per-sample caption loss, caption accuracy.

`concat` models splice image tokens into the sequence, so their logits are longer than the text; here
every connector's logits come back aligned with `input_ids` (position j predicts token j + 1), which is
what the gradient and accuracy measurements compare across connectors.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from ..data.collator import IGNORE_INDEX, HiveCaptionCollator


def caption_batch(loaded, images: list[Image.Image], captions: list[str], prompt: str = "") -> dict[str, torch.Tensor]:
    """Model inputs for (image, caption) pairs, built the way `hive-train` builds them (loss on the caption)."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions: give one caption per image")
    collator = HiveCaptionCollator(loaded.tokenizer, loaded.image_processor, image_token=loaded.image_token)
    samples = [
        {"image": image.convert("RGB"), "prompt": prompt, "caption": caption}
        for image, caption in zip(images, captions, strict=True)
    ]
    device = next(loaded.model.parameters()).device
    return {name: tensor.to(device) for name, tensor in collator(samples).items()}


def _concat_text_positions(model, input_ids: torch.Tensor, spliced_length: int) -> torch.Tensor:
    """(batch, text) column of each text token in a concat model's spliced sequence (right padding)."""
    batch, width = input_ids.shape
    marker = model.hive_image_token_id
    if marker is None:  # one image in front of every row
        tokens = spliced_length - width
        return torch.arange(width, device=input_ids.device).expand(batch, width) + tokens
    is_marker = (input_ids == marker).long()
    most = int(is_marker.sum(1).max())
    if most == 0:
        return torch.arange(width, device=input_ids.device).expand(batch, width)
    tokens = (spliced_length - width) // most + 1  # each marker became `tokens` columns
    markers_before = is_marker.cumsum(1) - is_marker
    return torch.arange(width, device=input_ids.device) + markers_before * (tokens - 1)


def aligned_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(batch, text, vocab) logits for `batch` (labels not needed), aligned with its `input_ids`."""
    inputs = {name: value for name, value in batch.items() if name != "labels"}
    logits = model(**inputs).logits
    input_ids = batch["input_ids"]
    if logits.shape[1] == input_ids.shape[1]:
        return logits
    if model.hive_connector.uses_cross_attention:
        raise RuntimeError(f"logits of length {logits.shape[1]} for {input_ids.shape[1]} text tokens")
    columns = _concat_text_positions(model, input_ids, logits.shape[1])
    return logits.gather(1, columns[..., None].expand(-1, -1, logits.shape[-1]))


def per_sample_caption_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(batch,) mean next-token cross-entropy over each sample's caption tokens."""
    target = labels[:, 1:]
    losses = F.cross_entropy(
        logits[:, :-1].transpose(1, 2).float(), target, ignore_index=IGNORE_INDEX, reduction="none"
    )
    counts = (target != IGNORE_INDEX).sum(1).clamp(min=1)
    return losses.sum(1) / counts


@torch.no_grad()
def scored_caption_tokens(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every caption token of `batch` (1-D, in order) and whether the model's top-1 prediction was that token."""
    predictions = aligned_logits(model, batch)[:, :-1].argmax(-1)  # position j predicts token j + 1
    target = batch["labels"][:, 1:]
    scored = target != IGNORE_INDEX
    return target[scored].cpu(), (predictions[scored] == target[scored]).cpu()


def caption_accuracy(model, batches: Any) -> float:
    """Teacher-forced top-1 accuracy on every caption token of an iterable of collated batches. Whether the
    image is what earns it: `image_reading` (content and structural tokens, real and swapped images)."""
    correct = [scored_caption_tokens(model, batch)[1] for batch in batches]
    scored = torch.cat(correct) if correct else torch.zeros(0, dtype=torch.bool)
    if scored.numel() == 0:
        raise ValueError("no caption tokens to score (every label is -100)")
    return float(scored.float().mean())
