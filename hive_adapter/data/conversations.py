"""Visual instruction data: LLaVA's conversation format, rendered by the model's own chat template.

LLaVA's instruction file (`llava_v1_5_mix665k.json` layout) is a list of entries
`{"id", "image"?: "file.jpg" | ["a.jpg", "b.jpg"], "conversations": [{"from": "human"|"gpt", "value"}, ...]}`:
several rounds per entry, `<image>` markers in the human turns, and entries without an image (text-only
instruction data). Every round is kept. A conversation becomes chat messages (`human` -> `user`, `gpt` ->
`assistant`, `system` -> `system`), each `<image>` an image part at its place; an entry with images but no marker
gets them at the start of its first user turn (LLaVA itself would train on such an entry without ever showing
the image to the text). The model's `HiveProcessor` renders them with
its chat template, the one inference uses, and its `{% generation %}` blocks say which tokens are the
assistant's: the loss is on every assistant turn and nothing else.

Truncation (`max_length`) never detaches an image from its text: a conversation whose last image marker would be
cut away is dropped before training, counted and named in a warning (`drop_cut_images`), and the collator refuses
a batch in which a marker is missing rather than give an image to the wrong text. A conversation that truncation
cuts otherwise (a later answer lost) is counted and named with the assistant tokens it loses, or dropped whole
(`--drop_cut_conversations`). Every image file is opened and checked before training (`image_checks`).

With `packing_length` (`hive-train --stage sft --packing`) conversations are packed several to a row by the
caption collator's own routine (`collator.text_rows` -> `pack_rows`): the model then keeps each conversation's
self-attention, cross-attention and images to itself (`hive_adapter.model.packing`, docs/ARCHITECTURE.md §8).
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..model.splice import IGNORE_INDEX
from .collator import check_packing_length, text_rows
from .datasets import IMAGE_MARKER, open_image

logger = logging.getLogger(__name__)

ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


@dataclass(frozen=True)
class ConversationRecord:
    """One entry: its id, its image files (none, one or several) and its turns as (role, text)."""

    id: str
    images: tuple[str, ...]
    turns: tuple[tuple[str, str], ...]

    def messages(self, images: Sequence[Any] | None = None) -> list[dict]:
        """Chat messages with an image part at each `<image>` marker (`images` in marker order; the file names
        when not given). Images without a marker go first in the first user turn; an entry with no user turn
        gets one holding just its images, before its first turn (after a system prompt, which stays first)."""
        pictures = list(self.images if images is None else images)
        markers = sum(text.count(IMAGE_MARKER) for _, text in self.turns)
        unplaced = pictures if markers == 0 else []
        queue = iter(pictures if markers else [])
        turns = list(self.turns)
        if unplaced and not any(role == "user" for role, _ in turns):
            first = next((number for number, (role, _) in enumerate(turns) if role != "system"), len(turns))
            turns.insert(first, ("user", ""))
        messages = []
        for role, text in turns:
            parts: list[dict] = []
            if role == "user" and unplaced:
                parts += [{"type": "image", "image": picture} for picture in unplaced]
                unplaced = []
            for number, piece in enumerate(text.split(IMAGE_MARKER)):
                if number:
                    parts.append({"type": "image", "image": next(queue)})
                if piece.strip():
                    parts.append({"type": "text", "text": piece.strip()})
            messages.append({"role": role, "content": parts})
        return messages


def read_llava_instruct(path: str | Path) -> list[ConversationRecord]:
    """LLaVA's instruction JSON: every round of every entry, entries with no, one or several images."""
    path = Path(path)
    try:
        entries = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(entries, list):
        raise ValueError(f"{path}: a JSON {type(entries).__name__}, expected LLaVA's list of conversations")
    records = []
    for number, entry in enumerate(entries):
        where = f"{path}: entry {number} ({entry.get('id', '?') if isinstance(entry, dict) else '?'})"
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(turns, list) or not turns:
            raise ValueError(f"{where}: no 'conversations' list")
        images = entry.get("image", [])
        images = [images] if isinstance(images, str) else images
        if not isinstance(images, list) or not all(isinstance(image, str) for image in images):
            raise ValueError(f"{where}: 'image' is {json.dumps(entry.get('image'))}, expected a file name or a list")
        parsed = []
        for turn in turns:
            if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
                raise ValueError(
                    f"{where}: a turn {json.dumps(turn)[:80]} is not {{'from': human|gpt|system, 'value': text}}"
                )
            parsed.append((ROLES[turn["from"]], turn["value"]))
        if not any(role == "assistant" for role, _ in parsed):
            raise ValueError(f"{where}: has no 'gpt' turn to learn from")
        markers = sum(text.count(IMAGE_MARKER) for _, text in parsed)
        if markers and markers != len(images):
            raise ValueError(
                f"{where}: {markers} {IMAGE_MARKER} markers for {len(images)} images; put one marker where each "
                "image goes (or none: the images then open the first human turn)"
            )
        if any(IMAGE_MARKER in text for role, text in parsed if role != "user"):
            raise ValueError(f"{where}: an {IMAGE_MARKER} marker outside a human turn")
        records.append(ConversationRecord(str(entry.get("id", number)), tuple(images), tuple(parsed)))
    return records


class ConversationDataset:
    """Conversation records + an image folder; images opened lazily. A sample is `{"messages", "source"}` with
    the PIL images inside the messages."""

    def __init__(self, records: list[ConversationRecord], image_folder: str | Path):
        if not records:
            raise ValueError("the instruction dataset is empty")
        self.records = list(records)
        self.image_folder = Path(image_folder)
        self.dropped: list[str] = []
        self.cut: list[str] = []  # kept conversations that truncation cuts, with the assistant tokens they lose
        self.skipped = 0  # entries with an unreadable image skipped (--skip_bad_images; hive-train's report field)

    def __len__(self) -> int:
        return len(self.records)

    def keeping(self, records: list[ConversationRecord], *, dropped: list[str]) -> ConversationDataset:
        """This dataset (same kind, same image source) with only `records`; `dropped` names the others."""
        kept = copy.copy(self)
        kept.records, kept.dropped = list(records), [*self.dropped, *dropped]
        return kept

    def _image(self, name: str) -> Image.Image:
        return open_image(self.image_folder / name)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        pictures = [self._image(name) for name in record.images]
        return {"messages": record.messages(pictures), "source": f"entry {record.id}"}

    def text_messages(self, index: int) -> list[dict]:
        """The messages without opening an image (placeholders stand for them): for length checks."""
        return self.records[index].messages()


def render(processor, messages: list[dict]) -> dict:
    """Token ids, assistant mask and images of one conversation through the processor's chat template."""
    return processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, return_tensors=None
    )


def drop_cut_images(
    dataset: ConversationDataset, processor, max_length: int, *, drop_cut_conversations: bool = False
) -> ConversationDataset:
    """The conversations that keep every image marker and some assistant token within `max_length` tokens; the
    others are dropped, counted and named in a warning. A kept conversation that truncation cuts (it loses
    assistant tokens beyond `max_length`: a later answer, the end of one) is counted and named with the tokens
    it loses, and the `--max_text_length` that keeps them all is suggested; with `drop_cut_conversations` it is
    dropped whole instead. No conversation left is an error.

    Each chunk of conversations is rendered by the chat template and tokenised in one call
    (`conversation_lengths`), once: the image markers and the assistant tokens come from the same rendering."""
    kept, cut_images, unsupervised, cut = [], [], [], []
    for record, lengths in zip(dataset.records, conversation_lengths(dataset, processor), strict=True):
        if lengths.last_marker is not None and lengths.last_marker >= max_length:
            cut_images.append(record.id)
        elif lengths.first_answer is None or lengths.first_answer >= max_length:
            unsupervised.append(record.id)
        else:
            lost = lengths.answer_tokens_from(max_length)
            if lost:
                cut.append((record.id, lost, lengths.assistant_tokens, lengths.tokens))
                if drop_cut_conversations:
                    continue
            kept.append(record)
    reasons = [
        (cut_images, "an image marker lies beyond it, and an image is never trained on without its text"),
        (unsupervised, "no assistant token is left within it to learn from"),
    ]
    if drop_cut_conversations:
        reasons.append(([name for name, *_ in cut], "truncation would cut their answers (--drop_cut_conversations)"))
    for names, reason in reasons:
        if names:
            logger.warning(
                "%d of %d conversations dropped at --max_text_length %d: %s (%s%s); raise --max_text_length to "
                "keep them",
                len(names),
                len(dataset.records),
                max_length,
                reason,
                ", ".join(f"entry {name}" for name in names[:5]),
                ", ..." if len(names) > 5 else "",
            )
    if cut and not drop_cut_conversations:
        logger.warning(
            "%d of %d conversations are cut at --max_text_length %d and lose %d assistant tokens in all (%s%s): "
            "--max_text_length %d keeps every one whole, --drop_cut_conversations drops them instead",
            len(cut),
            len(dataset.records),
            max_length,
            sum(lost for _, lost, _, _ in cut),
            ", ".join(f"entry {name} loses {lost} of {total}" for name, lost, total, _ in cut[:5]),
            ", ..." if len(cut) > 5 else "",
            max(length for *_, length in cut),
        )
    if not kept:
        raise ValueError(
            f"no conversation fits --max_text_length {max_length} with its images and an assistant turn "
            f"({len(cut_images)} lose an image, {len(unsupervised)} every answer"
            + (f", {len(cut)} some answers" if drop_cut_conversations else "")
            + "); raise --max_text_length"
        )
    dropped = cut_images + unsupervised + ([name for name, *_ in cut] if drop_cut_conversations else [])
    prepared = dataset.keeping(kept, dropped=dropped)
    prepared.cut = (
        [] if drop_cut_conversations else [f"entry {name}: {lost} assistant tokens" for name, lost, *_ in cut]
    )
    return prepared


@dataclass(frozen=True)
class ConversationLengths:
    """Where one rendered conversation's image markers and assistant tokens lie (token positions)."""

    tokens: int
    last_marker: int | None  # position of the last image marker (None: no image)
    answers: tuple[int, ...]  # positions of the assistant's tokens

    @property
    def first_answer(self) -> int | None:
        return self.answers[0] if self.answers else None

    @property
    def assistant_tokens(self) -> int:
        return len(self.answers)

    def answer_tokens_from(self, position: int) -> int:
        """Assistant tokens at or after `position` (what truncation there would cut)."""
        return sum(1 for answer in self.answers if answer >= position)


def conversation_lengths(
    dataset: ConversationDataset, processor, *, chunk: int = 2048
) -> Iterator[ConversationLengths]:
    """Every conversation of `dataset` rendered with `processor`'s chat template (placeholders for the images,
    none opened) and tokenised, `chunk` at a time: one batched call of the tokenizer's `apply_chat_template`
    per chunk, the assistant tokens from the template's `{% generation %}` blocks. A generator: only one
    chunk's results are alive at a time (at LLaVA-665k's size, keeping them all costs the garbage collector)."""
    marker = processor.image_token_id
    for start in range(0, len(dataset.records), chunk):
        conversations = [dataset.text_messages(index) for index in range(start, min(start + chunk, len(dataset)))]
        rendered = processor.tokenizer.apply_chat_template(
            conversations,
            chat_template=processor.chat_template,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
        )
        for ids, mask in zip(rendered["input_ids"], rendered["assistant_masks"], strict=True):
            markers = [position for position, token in enumerate(ids) if token == marker] if marker is not None else []
            answers = tuple(position for position, learn in enumerate(mask) if learn)
            yield ConversationLengths(len(ids), markers[-1] if markers else None, answers)


@dataclass
class HiveConversationCollator:
    """Batches conversations for HIVE: the chat template's ids, labels on the assistant's tokens only (every
    turn), right padding, truncation at `max_length`, the batch's images in marker order. With `packing_length`
    the conversations are packed several to a row as captions are (`collator.pack_rows`: position ids restarting
    at each, no attention mask, no label across a boundary), each one's images in the order the conversations
    stand; a text-only conversation brings none."""

    processor: Any
    max_length: int = 2048
    packing_length: int | None = None  # pack the batch's conversations into rows of this many tokens (None: pad)

    def __post_init__(self) -> None:
        check_packing_length(self.packing_length, self.max_length)
        if self.processor.tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to its eos token)")
        if self.processor.image_token is None:
            raise ValueError(
                "instruction data needs a model with an image marker (marker mode): conversations hold no, one or "
                "several images; hive-train's sft stage switches a captioning model to the '<image>' marker"
            )

    def encode(self, messages: list[dict]) -> tuple[list[int], list[int], list[Any]]:
        rendered = render(self.processor, messages)
        ids = list(rendered["input_ids"][0] if isinstance(rendered["input_ids"][0], list) else rendered["input_ids"])
        mask = rendered["assistant_masks"]
        mask = list(mask[0] if mask and isinstance(mask[0], list) else mask)
        labels = [token if learn else IGNORE_INDEX for token, learn in zip(ids, mask, strict=True)]
        images = [part["image"] for m in messages for part in m["content"] if part["type"] == "image"]
        return ids[: self.max_length], labels[: self.max_length], images

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        encoded = [self.encode(sample["messages"]) for sample in samples]
        marker = self.processor.image_token_id
        for sample, (ids, _, images) in zip(samples, encoded, strict=True):
            if ids.count(marker) != len(images):
                raise ValueError(
                    f"{sample.get('source', 'a sample')}: {len(images)} images but {ids.count(marker)} markers left "
                    f"after truncation at {self.max_length} tokens; drop such samples first (drop_cut_images) — an "
                    "image is never given to another sample's text"
                )
        batch, order = text_rows(
            [(ids, labels) for ids, labels, _ in encoded],
            pad_token_id=self.processor.tokenizer.pad_token_id,
            packing_length=self.packing_length,
        )
        pictures = [image for sample in order for image in encoded[sample][2]]  # in the order the samples stand
        if pictures:
            processed = self.processor.image_processor(images=pictures, return_tensors="pt")
            batch.update({key: value for key, value in processed.items()})
        return batch


# ---------------------------------------------------------------------- synthetic instruction data
QUESTIONS = {
    "colour": ("what colour is it ?", "which colour is the shape ?"),
    "shape": ("what shape is it ?", "which shape is it ?"),
    "texture": ("what texture is it ?", "which texture is the shape ?"),
    "position": ("where is it ?", "where is the shape ?"),
}
SECOND_IMAGE_QUESTION = "what colour is the second one ?"
REPEAT = "repeat :"


def instruction_vocabulary() -> list[str]:
    """Every word of the synthetic conversations and of the default chat template's roles (word tokenizers)."""
    from .synthetic import caption_vocabulary

    words = set(caption_vocabulary()) | {"USER:", "ASSISTANT:", *REPEAT.split(), *SECOND_IMAGE_QUESTION.split()}
    for phrasings in QUESTIONS.values():
        for question in phrasings:
            words.update(question.split())
    return sorted(words)


class SyntheticConversations(ConversationDataset):
    """Instruction conversations about the synthetic shapes, deterministic by (seed, index): one or two rounds
    of questions whose answers only the picture gives (colour, shape, texture, position; two phrasings each);
    every 10th conversation shows two pictures and asks about the second; every 8th has no picture (a text-only
    instruction: repeat a word). Answers are the attribute's words."""

    def __init__(self, size: int, *, seed: int = 0, image_size: int = 64, attributes: tuple[str, ...] = ()):
        import random

        from .synthetic import ATTRIBUTES, COLOURS, SyntheticShapes

        self.shapes = SyntheticShapes(2 * size, seed=seed, image_size=image_size)
        asked = attributes or ATTRIBUTES
        records = []
        for index in range(size):
            rng = random.Random(seed * 7_000_003 + index)
            sample = self.shapes.sample(index)
            if index % 8 == 7:
                word = rng.choice(list(COLOURS))
                turns = (("user", f"{REPEAT} {word}"), ("assistant", word))
                records.append(ConversationRecord(f"synthetic-{index}", (), turns))
                continue
            if index % 10 == 9:
                other = size + index  # a second picture from the second half of the pictures
                turns = (
                    ("user", f"{IMAGE_MARKER} {IMAGE_MARKER} {SECOND_IMAGE_QUESTION}"),
                    ("assistant", self.shapes.sample(other).colour),
                )
                records.append(ConversationRecord(f"synthetic-{index}", (f"#{index}", f"#{other}"), turns))
                continue
            first, second = rng.sample(list(asked), 2) if len(asked) > 1 else (asked[0], asked[0])
            turns = [("user", f"{IMAGE_MARKER}\n{rng.choice(QUESTIONS[first])}"), ("assistant", _answer(sample, first))]
            if rng.random() < 0.5:
                turns += [("user", rng.choice(QUESTIONS[second])), ("assistant", _answer(sample, second))]
            records.append(ConversationRecord(f"synthetic-{index}", (f"#{index}",), tuple(turns)))
        super().__init__(records, image_folder=".")

    def _image(self, name: str) -> Image.Image:
        return self.shapes.image(int(name[1:]))  # "#<index>": the synthetic picture, drawn on demand

    def swapped(self, index: int, offset: int = 1) -> dict:
        """Sample `index` with each picture replaced by sample `index + offset`'s (the control)."""
        record = self.records[index]
        pictures = [self.shapes.image((int(name[1:]) + offset) % len(self.shapes)) for name in record.images]
        return {"messages": record.messages(pictures), "source": f"entry {record.id} (swapped)"}


def _answer(sample, attribute: str) -> str:
    return getattr(sample, attribute)
