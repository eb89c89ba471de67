"""How many caption tokens a run will actually learn from, counted before training starts.

Text is truncated at `max_length` tokens (paper: 77), prompt first: a prompt at or over the budget leaves its
sample without a single label, and a data set of such samples trains on nothing while reporting loss 0. The
count uses the collator's own layout (BOS, marker, prompt, caption, EOS) on the texts alone, no images.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from .collator import HiveCaptionCollator

logger = logging.getLogger(__name__)

CHUNK = 4096  # texts tokenised per call
WARN_SHARE = 0.10  # warn when more than this share of samples loses every label


@dataclass(frozen=True)
class SupervisionReport:
    samples: int
    without_labels: int  # samples whose caption is cut away entirely
    supervised_tokens: int
    longest_prompt: int  # tokens in front of the caption (BOS, marker, prompt), the largest in the data
    longest_prompt_index: int
    max_length: int

    @property
    def share_without_labels(self) -> float:
        return self.without_labels / max(1, self.samples)

    def check(self) -> None:
        """Error if nothing can be learned; warning if more than 10% of the samples learn nothing."""
        if self.supervised_tokens == 0:
            raise ValueError(
                f"no sample has a caption token left to learn: the text budget is {self.max_length} tokens "
                f"(--max_text_length) and the prompts take up to {self.longest_prompt} of them (sample "
                f"{self.longest_prompt_index}). Shorten the prompts or raise --max_text_length."
            )
        if self.share_without_labels > WARN_SHARE:
            logger.warning(
                "%d of %d samples (%.0f%%) lose every caption token to the %d-token text budget (longest prompt: "
                "%d tokens, sample %d); they train nothing",
                self.without_labels,
                self.samples,
                100 * self.share_without_labels,
                self.max_length,
                self.longest_prompt,
                self.longest_prompt_index,
            )


def _lengths(tokenizer, texts: Sequence[str]) -> list[int]:
    lengths = []
    for start in range(0, len(texts), CHUNK):
        chunk = list(texts[start : start + CHUNK])
        encoded = tokenizer(chunk, add_special_tokens=False)["input_ids"]
        lengths += [len(ids) if text else 0 for ids, text in zip(encoded, chunk, strict=True)]
    return lengths


def supervision_report(collator: HiveCaptionCollator, texts: Sequence[tuple[str, str]]) -> SupervisionReport:
    """Count the caption tokens that survive truncation; `texts`: (prompt, caption) per sample."""
    tokenizer = collator.tokenizer
    prefix = (tokenizer.bos_token_id is not None) + (collator.image_token is not None)
    eos = tokenizer.eos_token_id is not None
    prompts = _lengths(tokenizer, [prompt for prompt, _ in texts])
    captions = _lengths(tokenizer, [caption for _, caption in texts])
    without, supervised, longest, longest_index = 0, 0, -1, 0
    for index, (prompt, caption) in enumerate(zip(prompts, captions, strict=True)):
        before = prefix + prompt
        labels = max(0, min(collator.max_length, before + caption + eos) - before)
        supervised += labels
        without += labels == 0
        if before > longest:
            longest, longest_index = before, index
    return SupervisionReport(
        samples=len(texts),
        without_labels=without,
        supervised_tokens=supervised,
        longest_prompt=longest,
        longest_prompt_index=longest_index,
        max_length=collator.max_length,
    )
