"""Image-caption datasets read from disk: LLaVA's pre-training JSON and a JSONL of {image, text}.

A sample is `{"image": PIL.Image, "prompt": str, "caption": str}`. An image that cannot be read is an
error naming the file, or, with `skip_bad_images=True`, replaced by the next readable sample and
counted (`dataset.skipped`), never a silently wrong batch.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

IMAGE_MARKER = "<image>"


class BadImageError(ValueError):
    """An image file that is missing or cannot be decoded."""


def open_image(path: Path) -> Image.Image:
    """The RGB picture at `path`, or a `BadImageError` naming the file."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (FileNotFoundError, UnidentifiedImageError, OSError) as error:
        raise BadImageError(f"cannot read image {path}: {error}") from error


@dataclass(frozen=True)
class CaptionRecord:
    image: str
    prompt: str
    caption: str


def llava_entry(entry_id: str, image: str, turns: list[str]) -> dict:
    """One sample of LLaVA's JSON: `turns` alternate human and gpt, starting with the human turn that carries
    the `<image>` marker."""
    speakers = ("human", "gpt")
    return {
        "id": entry_id,
        "image": image,
        "conversations": [{"from": speakers[number % 2], "value": value} for number, value in enumerate(turns)],
    }


def read_llava_json(path: str | Path) -> list[CaptionRecord]:
    """LLaVA's format: a list of {"image", "conversations": [{"from": "human"|"gpt", "value"}, ...]}.

    The first human turn (without the `<image>` marker) is the prompt, the first gpt turn the caption; entries
    with more rounds are named in a warning (their later turns are not trained on).
    """
    path = Path(path)
    try:
        entries = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        hint = " (one object per line? use --data_format jsonl)" if "Extra data" in str(error) else ""
        raise ValueError(f"{path}: not valid JSON ({error}){hint}") from error
    if not isinstance(entries, list):
        raise ValueError(f"{path}: a JSON {type(entries).__name__}, expected LLaVA's list of samples")
    records, multi_turn = [], []
    for number, entry in enumerate(entries):
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if not turns or "image" not in entry:
            raise ValueError(f"{path}: entry {number} has no 'image' and 'conversations' (LLaVA pre-training format)")
        where = f"{path}: entry {number} ({entry.get('id', '?')})"
        if not all(isinstance(turn, dict) for turn in turns):
            raise ValueError(f"{where}: 'conversations' must be a list of {{'from', 'value'}} objects")
        human = next((t.get("value") for t in turns if t.get("from") == "human"), "")
        answer = next((t.get("value") for t in turns if t.get("from") == "gpt"), None)
        if answer is None:
            raise ValueError(f"{where}: has no 'gpt' turn to learn from")
        if sum(isinstance(t, dict) and t.get("from") == "gpt" for t in turns) > 1:
            multi_turn.append(f"entry {number} ({entry.get('id', '?')})")
        prompt = _text(human, where, "human value").replace(IMAGE_MARKER, "").strip()
        records.append(
            CaptionRecord(_text(entry["image"], where, "image"), prompt, _text(answer, where, "gpt value").strip())
        )
    if multi_turn:
        logger.warning(
            "%s: %d of %d entries have more than one human/gpt round (%s%s); the pre-training reader learns one "
            "caption per image, so only its first round is trained on and the later turns are dropped",
            path,
            len(multi_turn),
            len(entries),
            ", ".join(multi_turn[:5]),
            ", ..." if len(multi_turn) > 5 else "",
        )
    return records


def _text(value, where: str, key: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: {key!r} is {json.dumps(value)}, expected a string")
    return value


def read_jsonl(path: str | Path) -> list[CaptionRecord]:
    """One JSON object per line: {"image": "file.png", "text": "a caption", "prompt": optional}."""
    path = Path(path)
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            hint = " (a LLaVA JSON file? use --data_format llava)" if line.strip() in ("[", "[{", "{") else ""
            raise ValueError(f"{where}: not valid JSON ({error}){hint}") from error
        if not isinstance(entry, dict):
            raise ValueError(
                f"{where}: a JSON {type(entry).__name__}, expected one object per line such as "
                '{"image": "file.png", "text": "a caption"} (a LLaVA JSON file? use --data_format llava)'
            )
        if "image" not in entry or "text" not in entry:
            raise ValueError(f"{where}: expected keys 'image' and 'text', got {sorted(entry)}")
        records.append(
            CaptionRecord(
                _text(entry["image"], where, "image"),
                _text(entry.get("prompt", ""), where, "prompt"),
                _text(entry["text"], where, "text"),
            )
        )
    return records


def read_records(path: str | Path, data_format: str = "auto") -> list[CaptionRecord]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--data_path {path}: no such file")
    if data_format == "auto":
        data_format = "jsonl" if path.suffix == ".jsonl" else "llava"
    readers = {"llava": read_llava_json, "jsonl": read_jsonl}
    if data_format not in readers:
        raise ValueError(f"--data_format {data_format!r}: expected auto, llava or jsonl")
    return readers[data_format](path)


class ImageCaptionDataset:
    """Records + an image folder; images are opened lazily, one sample at a time."""

    def __init__(self, records: list[CaptionRecord], image_folder: str | Path, *, skip_bad_images: bool = False):
        if not records:
            raise ValueError("the dataset is empty")
        self.records = records
        self.image_folder = Path(image_folder)
        self.skip_bad_images = skip_bad_images
        self.bad_files: set[str] = set()

    @property
    def skipped(self) -> int:
        return len(self.bad_files)

    def __len__(self) -> int:
        return len(self.records)

    def texts(self) -> list[tuple[str, str]]:
        """(prompt, caption) of every sample, without opening an image."""
        return [(record.prompt, record.caption) for record in self.records]

    def load_image(self, record: CaptionRecord) -> Image.Image:
        return open_image(self.image_folder / record.image)

    def __getitem__(self, index: int) -> dict:
        for offset in range(len(self.records)):
            record = self.records[(index + offset) % len(self.records)]
            try:
                image = self.load_image(record)
            except BadImageError as error:
                if not self.skip_bad_images:
                    raise BadImageError(f"{error} (pass --skip_bad_images to skip and count such files)") from error
                if record.image not in self.bad_files:
                    self.bad_files.add(record.image)
                    logger.warning("skipping unreadable image (%d so far): %s", self.skipped, error)
                continue
            return {
                "image": image,
                "prompt": record.prompt,
                "caption": record.caption,
                "source": str(self.image_folder / record.image),
            }
        raise BadImageError(f"no readable image in {self.image_folder}: all {len(self.records)} samples failed")
