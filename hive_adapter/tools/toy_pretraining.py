"""Pre-train the toy stand-ins the way real checkpoints come: the LM on text, the encoder image-text contrastive.

HIVE's paper starts from a pre-trained LLM and a pre-trained vision encoder and aligns them. Random toy
models are no stand-in for that: against a random, frozen LM stage 1 learns an image-independent offset
and the comparison measures nothing (issue #17). So before the three stages, identically for every
connector:

- the language model learns the caption corpus as plain text (next-token loss, no image);
- the vision encoder learns with SigLIP's sigmoid image-text loss against a throw-away bag-of-words text
  tower (generic contrastive pre-training: it is never told which attribute a word names). Images are
  embedded as the mean of the last layer's patch tokens, the features `hive-probe` reads.

Both use their own synthetic split (seeded apart from `hive-train`'s and the held-out sets) and write the
models back in place, so `hive-train --vision_model DIR/vision --language_model DIR/language` reads them.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer

from ..data.synthetic import PROMPT, SyntheticShapes
from ..model.loading import load_vision_encoder
from ..utils.console import progress

logger = logging.getLogger(__name__)

PRETRAINING_SEED_OFFSET = 20_000  # synthetic seeds of the pre-training splits: apart from hive-train's and held-out


@dataclass(frozen=True)
class ToyPretraining:
    """How long and how hard each stand-in is pre-trained; 0 steps leaves that model random."""

    language_steps: int = 300
    vision_steps: int = 600
    batch_size: int = 64
    language_learning_rate: float = 1e-3
    vision_learning_rate: float = 1e-3
    vision_images: int = 4000  # distinct pictures the contrastive split draws (each seen ~ steps*batch/images times)

    def __post_init__(self) -> None:
        for name in ("language_steps", "vision_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be 0 (no pre-training) or more")
        for name in ("batch_size", "vision_images"):
            if getattr(self, name) < 2:
                raise ValueError(f"{name}={getattr(self, name)}: must be at least 2")


def _cosine(step: int, total: int, peak: float) -> float:
    warmup = max(1, total // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _train(parameters, loss_of_step, *, steps: int, peak: float, description: str) -> list[float]:
    """AdamW with linear warmup and cosine decay to 0, gradient clipping 1.0; returns the loss per step."""
    parameters = list(parameters)
    optimizer = torch.optim.AdamW(parameters, lr=peak, weight_decay=0.0)
    losses = []
    for step in progress(range(steps), description=description):
        for group in optimizer.param_groups:
            group["lr"] = _cosine(step, steps, peak)
        loss = loss_of_step(step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def pretrain_language_model(directory: str | Path, settings: ToyPretraining, *, seed: int = 0) -> list[float]:
    """Next-token pre-training of `directory` (a causal LM + tokenizer) on synthetic prompts + captions, text only."""
    directory = Path(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory).train()
    corpus = SyntheticShapes(settings.language_steps * settings.batch_size, seed=PRETRAINING_SEED_OFFSET + seed)
    texts = [f"{PROMPT} {corpus.sample(i).caption}" for i in range(len(corpus))]  # captions need no picture

    def loss_of_step(step: int) -> torch.Tensor:
        rows = texts[step * settings.batch_size : (step + 1) * settings.batch_size]
        ids = [[tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
               for text in rows]  # fmt: skip
        width = max(map(len, ids))
        input_ids = torch.full((len(ids), width), tokenizer.pad_token_id)
        for row, tokens in enumerate(ids):
            input_ids[row, : len(tokens)] = torch.tensor(tokens)
        attention_mask = (torch.arange(width) < torch.tensor([len(t) for t in ids])[:, None]).long()
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss

    torch.manual_seed(seed)
    losses = _train(
        model.parameters(), loss_of_step, steps=settings.language_steps, peak=settings.language_learning_rate,
        description="pre-training the toy LM (text)",
    )  # fmt: skip
    model.save_pretrained(directory)
    logger.info("toy LM pre-trained: loss %.3f -> %.3f in %d steps", losses[0], losses[-1], len(losses))
    return losses


class BagOfWordsTextTower(nn.Module):
    """The throw-away text side of contrastive pre-training: mean word embedding, then a linear map."""

    def __init__(self, *, vocabulary: int, width: int):
        super().__init__()
        self.embedding = nn.EmbeddingBag(vocabulary, width, mode="mean")
        self.projection = nn.Linear(width, width)

    def forward(self, token_ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.projection(self.embedding(token_ids, offsets))  # (captions, width)


def siglip_loss(
    images: torch.Tensor, texts: torch.Tensor, same_caption: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss; pairs with the same caption are positives (the toy set repeats captions)."""
    logits = F.normalize(images, dim=-1) @ F.normalize(texts, dim=-1).T * scale.exp() + bias  # (images, texts)
    signs = same_caption.float() * 2 - 1
    return -F.logsigmoid(signs * logits).sum() / images.shape[0]


def _pixel_values(processor, dataset: SyntheticShapes, chunk: int = 256) -> torch.Tensor:
    """(images, channels, height, width): every picture of `dataset`, drawn and processed once."""
    chunks = []
    for start in progress(range(0, len(dataset), chunk), description="drawing the contrastive split"):
        images = [dataset.image(i) for i in range(start, min(start + chunk, len(dataset)))]
        chunks.append(processor(images=images, return_tensors="pt")["pixel_values"])
    return torch.cat(chunks)


def pretrain_vision_encoder(directory: str | Path, settings: ToyPretraining, *, seed: int = 0) -> list[float]:
    """Contrastive image-text pre-training of the vision encoder in `directory` on a synthetic split."""
    directory = Path(directory)
    encoder = load_vision_encoder(directory).train()
    processor = AutoImageProcessor.from_pretrained(directory)
    split = SyntheticShapes(
        settings.vision_images, seed=PRETRAINING_SEED_OFFSET + seed, image_size=encoder.config.image_size
    )
    pixels = _pixel_values(processor, split)  # (images, channels, height, width)
    captions = [split.caption(i) for i in range(len(split))]
    words = sorted({word for caption in captions for word in caption.split()})
    caption_ids = [torch.tensor([words.index(word) for word in caption.split()]) for caption in captions]
    width = encoder.config.hidden_size
    torch.manual_seed(seed)
    text_tower = BagOfWordsTextTower(vocabulary=len(words), width=width)
    image_head = nn.Linear(width, width)  # thrown away with the text tower
    scale = nn.Parameter(torch.tensor(math.log(10.0)))
    bias = nn.Parameter(torch.tensor(-10.0))
    order = random.Random(seed)

    def loss_of_step(step: int) -> torch.Tensor:
        batch = order.sample(range(len(split)), settings.batch_size)
        hidden = encoder(pixel_values=pixels[batch]).last_hidden_state  # (batch, patches, width)
        images = image_head(hidden.mean(1))
        ids = [caption_ids[i] for i in batch]
        offsets = torch.tensor([0, *torch.tensor([len(t) for t in ids[:-1]]).cumsum(0).tolist()])
        texts = text_tower(torch.cat(ids), offsets)
        same = torch.tensor([[captions[i] == captions[j] for j in batch] for i in batch])
        return siglip_loss(images, texts, same, scale, bias)

    parameters = [*encoder.parameters(), *text_tower.parameters(), *image_head.parameters(), scale, bias]
    losses = _train(
        parameters, loss_of_step, steps=settings.vision_steps, peak=settings.vision_learning_rate,
        description="pre-training the toy encoder (contrastive)",
    )  # fmt: skip
    encoder.save_pretrained(directory)
    logger.info("toy encoder pre-trained: loss %.3f -> %.3f in %d steps", losses[0], losses[-1], len(losses))
    return losses


def pretrain_toy_models(directory: str | Path, settings: ToyPretraining = ToyPretraining(), *, seed: int = 0) -> dict:
    """Pre-train `directory/language` and `directory/vision` (written by `write_toy_models`) in place; returns
    the loss curves, {"language": [...], "vision": [...]} (empty where 0 steps were asked for)."""
    directory = Path(directory)
    curves = {"language": [], "vision": []}
    if settings.language_steps:
        curves["language"] = pretrain_language_model(directory / "language", settings, seed=seed)
    if settings.vision_steps:
        curves["vision"] = pretrain_vision_encoder(directory / "vision", settings, seed=seed)
    return curves
