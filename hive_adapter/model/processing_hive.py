"""`HiveProcessor`: what turns images, text and chat messages into a HIVE model's inputs.

A regular transformers `ProcessorMixin` (image processor + tokenizer + chat template), registered with
`AutoProcessor` for `model_type="hive"`: `AutoProcessor.from_pretrained(dir)`, `pipeline("image-text-to-text")`,
`processor.apply_chat_template(messages)` and `transformers serve` all find it once `hive_adapter` is imported.

HIVE never expands an image into placeholder tokens: an image occupies no sequence position, so the processor
writes one marker token where each image goes and the model's cross-attention does the rest (the `concat`
baseline splices the image's tokens in at that marker itself). Two kinds of model:

- **marker mode** (`HiveConfig.image_token_id` set): each image has its marker in the text, in order; a sample
  may hold several images or none, and a batch may mix both. The number of markers must equal the number of
  images, per batch; a mismatch is refused naming both counts.
- **captioning mode** (no marker token, hive-train's default pre-training): every sample is paired with exactly
  one image, which every token sees; the chat template renders an image as nothing.

The default chat template is LLaVA-1.5's layout (`USER: <image>\\n... ASSISTANT: ...`), written here; pass
`chat_template=` (or assign `processor.chat_template`) to replace it. Fine-tuning renders conversations with
the same template, and its assistant turns are wrapped in `{% generation %}` so that
`return_assistant_tokens_mask=True` marks exactly the tokens the loss is on.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

from transformers import ProcessorMixin

logger = logging.getLogger(__name__)

DEFAULT_IMAGE_TOKEN = "<image>"


def llava_chat_template(image_token: str | None) -> str:
    """LLaVA-1.5's conversation layout as a Jinja chat template, with `image_token` (or nothing, in captioning
    mode) where each image part stands. The text starts with the tokenizer's BOS token; a system message goes first as plain text; every user turn is
    `USER: ` + its parts + a space; every assistant turn `ASSISTANT: ` + its text + EOS, inside a generation
    block; `add_generation_prompt` ends with `ASSISTANT:`."""
    image = json.dumps(image_token + "\n" if image_token else "")  # a Jinja string literal
    return (
        "{%- if bos_token -%}{{ bos_token }}{%- endif -%}"
        "{%- for message in messages -%}"
        "{%- set parts = [{'type': 'text', 'text': message['content']}] if message['content'] is string "
        "else message['content'] -%}"
        "{%- if message['role'] == 'system' -%}"
        "{%- for part in parts if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}{{ ' ' }}"
        "{%- elif message['role'] == 'assistant' -%}"
        "{{ 'ASSISTANT: ' }}{%- generation -%}"
        "{%- for part in parts if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}{{ eos_token }}"
        "{%- endgeneration -%}{{ ' ' }}"
        "{%- else -%}"
        "{{ message['role'] | upper }}{{ ': ' }}"
        "{%- for part in parts -%}"
        f"{{%- if part['type'] == 'image' -%}}{{{{ {image} }}}}"
        "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
        "{%- endfor -%}{{ ' ' }}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
    )


class HiveProcessor(ProcessorMixin):
    """Image processor + tokenizer + chat template for a HIVE model.

    Args:
        image_processor (`BaseImageProcessor`): the vision encoder's image processor.
        tokenizer (`PreTrainedTokenizerBase`): the language model's tokenizer.
        chat_template (`str`, *optional*): a Jinja chat template; LLaVA-1.5's layout when not given.
        image_token (`str` or `None`): the marker written where each image goes; `None` for a captioning-mode model
            (one image per sample, no marker). Must be a single token of `tokenizer`.
    """

    # Generation pads on the left (new tokens follow every prompt directly); training collators pad themselves.
    text_kwargs = {"padding": True, "padding_side": "left"}

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, image_token=DEFAULT_IMAGE_TOKEN):
        self.image_token = image_token
        self.image_token_id = None
        if image_token is not None and tokenizer is not None:
            self.image_token_id = _single_token_id(tokenizer, image_token)
        if chat_template is None:
            chat_template = llava_chat_template(image_token)
        if getattr(image_processor, "do_pan_and_scan", False):
            raise ValueError(
                f"{type(image_processor).__name__} has do_pan_and_scan=True: its crops come as extra images that the "
                "family's processor announces in the text, and a HIVE model reads each image once. Set "
                "image_processor.do_pan_and_scan = False before building the HiveProcessor"
            )
        if getattr(image_processor, "return_row_col_info", True) is False:
            # Idefics3 / SmolVLM split an image into crops; the model reads which crops make one image from the
            # rows and columns its image processor reports when asked (the family's processor writes them as text).
            # Set here, not only in from_processor: the flag is not saved with the image processor, and a
            # reloaded processor without it would hand the model every crop as an image.
            image_processor = copy.deepcopy(image_processor)
            image_processor.return_row_col_info = True
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    # ------------------------------------------------------------------ construction
    @classmethod
    def for_model(cls, model_or_config: Any, *, tokenizer: Any, image_processor: Any, chat_template: str | None = None):
        """The processor for a HIVE model (or its `HiveConfig`): its marker token is the model's
        `image_token_id` as `tokenizer` spells it, or none in captioning mode."""
        config = getattr(model_or_config, "config", model_or_config)
        image_token_id = getattr(config, "image_token_id", None)
        image_token = None
        if image_token_id is not None:
            image_token = tokenizer.convert_ids_to_tokens(int(image_token_id)) if image_token_id >= 0 else None
            if image_token is None:  # an id beyond the vocabulary (an embedding table larger than the tokenizer)
                raise ValueError(
                    f"the model's image_token_id={image_token_id} is not a token of this tokenizer ({len(tokenizer)} "
                    "tokens): give the tokenizer the model was trained with (its marker added as a special token), "
                    "or set the model's image_token_id to the marker's id in this tokenizer"
                )
        return cls(image_processor, tokenizer, chat_template=chat_template, image_token=image_token)

    @classmethod
    def from_processor(cls, processor: Any, *, chat_template: str | None = None) -> HiveProcessor:
        """The HIVE processor of a VLM family's own processor (Qwen2.5-VL's, SmolVLM's, ...): the same image
        processor, tokenizer, chat template and image token, but one image token per image where the family's
        processor writes a run of placeholders (HIVE's images take no sequence positions). One line:

            processor = HiveProcessor.from_processor(AutoProcessor.from_pretrained("Qwen/Qwen2.5-VL-7B-Instruct"))
        """
        tokenizer = getattr(processor, "tokenizer", None)
        image_processor = getattr(processor, "image_processor", None)
        if tokenizer is None or image_processor is None:
            raise ValueError(
                f"{type(processor).__name__} has no tokenizer and image processor; pass a vision-language "
                "processor (AutoProcessor.from_pretrained of a VLM), or build HiveProcessor(image_processor, tokenizer)"
            )
        image_token = getattr(processor, "image_token", None) or getattr(tokenizer, "image_token", None)
        if image_token is None:
            raise ValueError(
                f"{type(processor).__name__} names no image token (processor.image_token); build "
                "HiveProcessor(image_processor, tokenizer, image_token=...) with the marker the model uses"
            )
        template = chat_template if chat_template is not None else getattr(processor, "chat_template", None)
        return cls(image_processor, tokenizer, chat_template=template, image_token=image_token)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs: Any):
        """`ProcessorMixin.from_pretrained`. A directory written before processors were saved (a tokenizer and an
        image processor next to a HIVE `config.json`) loads too: the marker is then the model's."""
        if "image_token" not in kwargs and not _saved_processor_config(pretrained_model_name_or_path):
            kwargs["image_token"] = _marker_of_saved_model(pretrained_model_name_or_path, kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    # ------------------------------------------------------------------ processing
    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        """An image keeps its single marker: HIVE's images take no sequence positions."""
        return self.image_token

    def validate_inputs(self, images=None, text=None, videos=None, audio=None, **kwargs: Any) -> None:
        if videos is not None or audio is not None:
            raise ValueError("a HIVE model reads images and text; it takes no videos or audio")
        if images is None and text is None:
            raise ValueError("HiveProcessor needs images=, text=, or both")
        if text is None:
            raise ValueError(
                "HiveProcessor got images without text; give each sample its text (an empty string is fine)"
            )
        texts = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(sample, str) for sample in texts):
            raise ValueError("text must be a string or a list of strings (use apply_chat_template for chat messages)")
        per_sample = _images_per_sample(images, len(texts))
        if self.image_token is None:
            self._check_one_image_per_sample(images, per_sample, len(texts))
            return
        markers = [sample.count(self.image_token) for sample in texts]
        given = 0 if images is None else len(_flat(images))
        if sum(markers) != given or (per_sample is not None and per_sample != markers):
            detail = f"; images per sample: {per_sample}" if per_sample is not None else ""
            raise ValueError(
                f"the text holds {sum(markers)} image markers {self.image_token!r} (per sample: {markers}) but "
                f"{given} images were given{detail}. Put one {self.image_token!r} where each image goes, in order "
                "(chat messages place them for you: processor.apply_chat_template)."
            )

    def _check_one_image_per_sample(self, images, per_sample: list[int] | None, samples: int) -> None:
        """Captioning mode: no marker, so every sample is paired with exactly one image (or none has one)."""
        if images is None:
            return
        counts = per_sample if per_sample is not None else [len(_flat(images))]
        if per_sample is None and counts[0] == samples:
            return
        if per_sample is not None and all(count == 1 for count in per_sample):
            return
        raise ValueError(
            f"this model pairs exactly one image with each sample (it has no image marker token: captioning mode) "
            f"but got {sum(counts)} images for {samples} samples (per sample: {counts}). Give one image per text, "
            "or train with an image marker (HiveConfig(image_token_id=...)) for several or none."
        )

    @property
    def unused_input_names(self) -> list[str]:
        """Gemma 3's image processor counts each image's pan-and-scan crops (`num_crops`) for its processor's text;
        HIVE writes one marker per image and its model takes no such count."""
        return [*super().unused_input_names, "num_crops"]

    @property
    def model_input_names(self) -> list[str]:
        names = list(self.tokenizer.model_input_names) + list(self.image_processor.model_input_names)
        return list(dict.fromkeys(names))


# ---------------------------------------------------------------------- helpers
def _single_token_id(tokenizer: Any, token: str) -> int:
    """The id of `token`, refused unless the tokenizer spells it as exactly one token."""
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
        raise ValueError(
            f"image_token={token!r} is not a single token of this tokenizer (it encodes to {ids}); add it with "
            f"tokenizer.add_special_tokens({{'additional_special_tokens': [{token!r}]}}) and resize the model's "
            "embeddings, or pass the marker the model was trained with"
        )
    return int(ids[0])


def _flat(images: Any) -> list:
    """One image, a list of images, a list of per-sample lists, or a batch as one 4-D array or tensor
    ((N, H, W, C) or (N, C, H, W): N images, as the image processor reads it), as one flat list (transformers' own
    `make_flat_list_of_images` is not in the 4.x releases LLaVA pins, where this module is imported too)."""
    if getattr(images, "ndim", None) == 4:
        return list(images)
    if not isinstance(images, (list, tuple)):
        return [images]
    return [image for item in images for image in (item if isinstance(item, (list, tuple)) else [item])]


def _images_per_sample(images: Any, samples: int) -> list[int] | None:
    """Per-sample image counts when `images` is nested one list per sample (what apply_chat_template passes);
    None when it is flat (one image, or a flat list)."""
    if not isinstance(images, (list, tuple)) or not images or not all(isinstance(i, (list, tuple)) for i in images):
        return None
    if len(images) != samples:
        raise ValueError(f"images holds {len(images)} per-sample lists for {samples} texts; give one list per text")
    return [len(sample) for sample in images]


def _saved_processor_config(path: Any) -> bool:
    return Path(str(path), "processor_config.json").is_file()


def _marker_of_saved_model(path: Any, kwargs: dict) -> str | None:
    """The marker of the HIVE model saved at `path` (None: captioning mode); the default marker elsewhere."""
    config_file = Path(str(path), "config.json")
    if not config_file.is_file():
        return DEFAULT_IMAGE_TOKEN
    config = json.loads(config_file.read_text())
    if config.get("model_type") != "hive":
        return DEFAULT_IMAGE_TOKEN
    image_token_id = config.get("image_token_id")
    if image_token_id is None:
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, **{k: v for k, v in kwargs.items() if k in ("revision",)})
    return tokenizer.convert_ids_to_tokens(int(image_token_id))


def _register_auto_processor() -> None:
    """`AutoProcessor.from_pretrained` finds `HiveProcessor` for `model_type="hive"`."""
    from transformers import AutoProcessor

    from .config import HiveConfig

    try:
        AutoProcessor.register(HiveConfig, HiveProcessor, exist_ok=True)
    except TypeError:  # transformers without `exist_ok`
        try:
            AutoProcessor.register(HiveConfig, HiveProcessor)
        except ValueError:  # already registered by an earlier import
            pass
