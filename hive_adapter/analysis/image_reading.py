"""Does a model read the picture? Caption-token accuracy by kind of token, with real and swapped images.

Withholding the image (a masked-out dummy in its place) only shows that *an* image changes the output: an
image-independent offset that the dummy removes looks like "using the image". The control
here keeps an image but gives sample i the image of sample i + 1 of the evaluated set: a model that reads
the picture loses its content tokens, one that does not keeps its accuracy. Tokens are split into content
(the words that name what is in the picture; for the synthetic set `ATTRIBUTE_WORDS`: colour, texture,
shape, position) and structural (every other caption token: a / in / the, the end of text), which the
text alone predicts.

Used by `make demo` and `hive-reproduce`; `ImageReading.describe()` is the one-line report both print.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.collator import HiveCaptionCollator
from ..data.synthetic import ATTRIBUTE_WORDS
from .captioning import scored_caption_tokens

ALL, CONTENT, STRUCTURAL = "all", "content", "structural"


@dataclass
class ImageReading:
    """Teacher-forced top-1 accuracy per token group. `real`: every sample with its own image; `swapped`:
    sample i with sample i + 1's image. Groups: "all", "content", "structural" and one per content group
    (e.g. "colour"); `tokens` counts the scored tokens of each."""

    real: dict[str, float]
    swapped: dict[str, float]
    tokens: dict[str, int]

    def image_dependent(self, group: str = CONTENT) -> float:
        """Accuracy on `group` that the sample's own image earns over another sample's image."""
        return self.real[group] - self.swapped[group]

    def to_dict(self) -> dict:
        return {
            "real": self.real,
            "swapped": self.swapped,
            "tokens": self.tokens,
            "image_dependent": {group: self.image_dependent(group) for group in self.real},
        }

    def describe(self) -> str:
        """E.g. `content 89.1% (swapped image 29.5%), structural 99.8% (99.7%)`."""
        return (
            f"content {self.real[CONTENT]:.1%} (swapped image {self.swapped[CONTENT]:.1%}), "
            f"structural {self.real[STRUCTURAL]:.1%} ({self.swapped[STRUCTURAL]:.1%})"
        )


def token_groups(tokenizer, words_by_group: Mapping[str, Sequence[str]]) -> dict[int, str]:
    """Token id -> group for every token of every listed word (tokenised alone and after a space, so subword
    tokenizers' pieces count too). A token listed under two groups is refused."""
    groups: dict[int, str] = {}
    for group, words in words_by_group.items():
        for word in words:
            for text in (word, " " + word):
                for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
                    if token == tokenizer.unk_token_id:
                        continue
                    if groups.setdefault(token, group) != group:
                        raise ValueError(f"token {token} ({word!r}) is in both {groups[token]!r} and {group!r}")
    if not groups:
        raise ValueError(f"none of the words of {sorted(words_by_group)} is a token of this tokenizer")
    return groups


def _accuracies(model, batches, groups: Mapping[int, str], names: Sequence[str]) -> tuple[dict, dict]:
    targets, correct = zip(*(scored_caption_tokens(model, batch) for batch in batches), strict=True)
    targets, correct = torch.cat(targets), torch.cat(correct)
    group_of = [groups.get(token, STRUCTURAL) for token in targets.tolist()]
    content = torch.tensor([group != STRUCTURAL for group in group_of])
    masks = {ALL: torch.ones_like(content), CONTENT: content, STRUCTURAL: ~content}
    masks |= {name: torch.tensor([group == name for group in group_of]) for name in names}
    accuracy = {
        name: float(correct[mask].float().mean()) if mask.any() else float("nan") for name, mask in masks.items()
    }
    return accuracy, {name: int(mask.sum()) for name, mask in masks.items()}


def image_reading(
    model,
    collator: HiveCaptionCollator,
    samples: Sequence[dict],
    groups: Mapping[int, str],
    *,
    batch_size: int = 64,
) -> ImageReading:
    """Score `samples` (`{"image", "prompt", "caption"}` dicts, at least two) with their own images and with
    the next sample's; `groups` maps content token ids to their group (`token_groups`)."""
    samples = [samples[i] for i in range(len(samples))]  # each picture drawn once, used twice
    if len(samples) < 2:
        raise ValueError(f"{len(samples)} sample: the swapped-image control needs at least two")
    swapped = [{**sample, "image": samples[(i + 1) % len(samples)]["image"]} for i, sample in enumerate(samples)]
    device = next(model.parameters()).device
    names = sorted(set(groups.values()))

    def batches(rows):
        for start in range(0, len(rows), batch_size):
            yield {name: tensor.to(device) for name, tensor in collator(rows[start : start + batch_size]).items()}

    was_training = model.training
    model.eval()
    try:
        real, counts = _accuracies(model, batches(samples), groups, names)
        control, _ = _accuracies(model, batches(swapped), groups, names)
    finally:
        model.train(was_training)
    return ImageReading(real=real, swapped=control, tokens=counts)


def checkpoint_image_reading(
    checkpoint: str | Path,
    samples: Sequence[dict],
    *,
    words_by_group: Mapping[str, Sequence[str]] = ATTRIBUTE_WORDS,
    batch_size: int = 64,
) -> ImageReading:
    """`image_reading` of a saved HIVE checkpoint (any connector), batched the way `hive-train` batches;
    content tokens: the synthetic set's attribute words by default."""
    from ..model.loading import load_hive

    loaded = load_hive(checkpoint)
    collator = HiveCaptionCollator(loaded.tokenizer, loaded.image_processor, image_token=loaded.image_token)
    groups = token_groups(loaded.tokenizer, words_by_group)
    return image_reading(loaded.model, collator, samples, groups, batch_size=batch_size)
