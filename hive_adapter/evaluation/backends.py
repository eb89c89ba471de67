"""Answer questions about images with a trained model: the engine behind the lmms-eval `hive` model.

Two backends, one interface (`generate`, `loglikelihood`), independent of lmms-eval itself:

- `HiveBackend`: a `HiveForConditionalGeneration` checkpoint, or a HIVE adapter on its llava-hf base;
  batched generation runs the vision tower and every block's K/V once per prompt;
- `LlavaBackend`: a LLaVA-repo checkpoint (`llava-torch`), trained with `--vision_connector hive`,
  `cascaded` or LLaVA's own `mlp` (the paper's protocol evaluates the exported encoder that way),
  loaded by LLaVA's own `load_pretrained_model` and prompted with its conversation templates.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from ..data.collator import IGNORE_INDEX

logger = logging.getLogger(__name__)

IMAGE_MARKER = "<image>"


@dataclass
class GenerationSettings:
    """lmms-eval's `generation_kwargs`, with the defaults its tasks assume (greedy, 1 beam)."""

    max_new_tokens: int = 128
    until: tuple[str, ...] = ()
    temperature: float = 0.0
    top_p: float | None = None
    num_beams: int = 1

    @classmethod
    def from_task(cls, kwargs: dict, *, default_max_new_tokens: int = 128) -> GenerationSettings:
        kwargs = dict(kwargs)
        until = kwargs.pop("until", ())
        if isinstance(until, str):
            until = (until,)
        elif not isinstance(until, (list, tuple)):
            raise ValueError(f"generation_kwargs until={until!r}: expected a string or a list of strings")
        do_sample = kwargs.pop("do_sample", None)
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        if do_sample is False:
            temperature = 0.0
        return cls(
            max_new_tokens=int(kwargs.pop("max_new_tokens", default_max_new_tokens)),
            until=tuple(until),
            temperature=temperature,
            top_p=kwargs.pop("top_p", None),
            num_beams=int(kwargs.pop("num_beams", 1) or 1),
        )

    def generate_kwargs(self) -> dict:
        sampling = self.temperature > 0
        out = {"max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams, "do_sample": sampling}
        if sampling:
            out["temperature"] = self.temperature
            if self.top_p is not None:
                out["top_p"] = self.top_p
        return out

    def cut(self, text: str) -> str:
        """`text` up to the first stop string."""
        for stop in self.until:
            if stop and stop in text:
                text = text.split(stop, 1)[0]
        return text


class HiveBackend:
    """A HIVE model loaded with `hive_adapter.model.loading.load_hive`."""

    def __init__(self, loaded, *, prompt_format: str = "auto"):
        if prompt_format not in ("auto", "plain", "chat"):
            raise ValueError(f"prompt_format={prompt_format!r}: expected 'auto', 'plain' or 'chat'")
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        has_template = getattr(self.tokenizer, "chat_template", None) is not None
        if prompt_format == "chat" and not has_template:
            raise ValueError("prompt_format='chat' but the tokenizer has no chat template")
        self.use_chat = prompt_format == "chat" or (prompt_format == "auto" and has_template)
        self.device = next(self.model.parameters()).device

    def prompt(self, context: str, num_images: int) -> str:
        """The text the model reads: the image markers (for models that place images) and the chat template."""
        marker = self.loaded.image_token
        context = context.replace(IMAGE_MARKER, "").strip() if marker is None else context
        if marker is not None and num_images and marker not in context:
            context = f"{marker * num_images}\n{context}"
        if self.use_chat:
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": context}], tokenize=False, add_generation_prompt=True
            )
        return context

    def _images(self, images: Sequence[Sequence[Image.Image]]) -> torch.Tensor | None:
        counts = {len(row) for row in images}
        flat = [image.convert("RGB") for row in images for image in row]
        if not flat:
            return None
        if self.loaded.image_token is None and counts != {1}:
            raise ValueError(
                f"this HIVE model pairs exactly one image with each prompt (no image marker token); got prompts with "
                f"{sorted(counts)} images. Batch prompts by their image count, one image each."
            )
        pixels = self.loaded.image_processor(images=flat, return_tensors="pt")["pixel_values"]
        return pixels.to(self.device)

    def _encode(self, texts: list[str], *, padding_side: str) -> dict[str, torch.Tensor]:
        self.tokenizer.padding_side = padding_side
        # a chat template writes its own BOS; plain text gets the tokenizer's special tokens
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not self.use_chat)
        return {
            "input_ids": batch["input_ids"].to(self.device),
            "attention_mask": batch["attention_mask"].to(self.device),
        }

    @torch.no_grad()
    def generate(
        self, contexts: Sequence[str], images: Sequence[Sequence[Image.Image]], settings: GenerationSettings
    ) -> list[str]:
        """Answers for a batch of prompts (each with its own images, the same count per prompt)."""
        texts = [self.prompt(context, len(row)) for context, row in zip(contexts, images, strict=True)]
        inputs = self._encode(texts, padding_side="left")
        pixel_values = self._images(images)
        output = self.model.generate(
            **inputs,
            pixel_values=pixel_values,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            **settings.generate_kwargs(),
        )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        return [
            settings.cut(text).strip() for text in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        ]

    @torch.no_grad()
    def loglikelihood(self, context: str, continuation: str, images: Sequence[Image.Image]) -> tuple[float, bool]:
        """(sum of log-probabilities of `continuation` after `context`, whether greedy decoding produces it)."""
        from ..analysis.captioning import aligned_logits

        prompt = self.prompt(context, len(images))
        inputs = self._encode([prompt + continuation], padding_side="right")
        prefix = len(self._encode([prompt], padding_side="right")["input_ids"][0])
        labels = inputs["input_ids"].clone()
        labels[:, :prefix] = IGNORE_INDEX
        logits = aligned_logits(self.model, {**inputs, "pixel_values": self._images([list(images)])})
        return score_continuation(logits, labels)


def score_continuation(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, bool]:
    """(sum log-prob, all-greedy) of the labelled tokens; logits (1, length, vocab) aligned with labels."""
    target = labels[0, 1:]
    scored = target != IGNORE_INDEX
    if not scored.any():
        raise ValueError("the continuation is empty after tokenisation: nothing to score")
    log_probs = torch.log_softmax(logits[0, :-1].float(), dim=-1)[scored]
    chosen = log_probs.gather(-1, target[scored][:, None]).squeeze(-1)
    greedy = bool((log_probs.argmax(-1) == target[scored]).all())
    return float(chosen.sum()), greedy


class LlavaBackend:
    """A LLaVA-repo checkpoint (any connector), through LLaVA's own loader and conversation templates."""

    def __init__(
        self, model_path: str, *, model_base: str | None = None, conv_mode: str = "vicuna_v1", device: str = "cpu"
    ):
        from ..integrations.llava.patch import apply_patch

        apply_patch()
        from llava.conversation import conv_templates
        from llava.mm_utils import get_model_name_from_path
        from llava.model.builder import load_pretrained_model

        if conv_mode not in conv_templates:
            raise ValueError(f"conv_mode={conv_mode!r}: LLaVA's templates are {sorted(conv_templates)}")
        self.conv_template = conv_templates[conv_mode]
        name = get_model_name_from_path(model_path)
        if "llava" not in name.lower():  # LLaVA's loader keys multimodal loading on the directory's name
            name = f"llava-{name}"
        self.tokenizer, self.model, self.processor, _ = load_pretrained_model(
            model_path, model_base, name, device=device
        )
        self.model.eval()
        self.model.config.tokenizer_padding_side = "left"  # LLaVA re-pads after splicing: left for batched decoding
        self.device = self.model.device

    def prompt(self, context: str, num_images: int, answer: str | None = None) -> str:
        from llava.constants import DEFAULT_IMAGE_TOKEN

        if num_images and DEFAULT_IMAGE_TOKEN not in context:
            context = f"{DEFAULT_IMAGE_TOKEN}\n" * num_images + context
        conversation = self.conv_template.copy()
        conversation.append_message(conversation.roles[0], context)
        conversation.append_message(conversation.roles[1], answer)
        return conversation.get_prompt()

    def _ids(self, text: str) -> torch.Tensor:
        from llava.constants import IMAGE_TOKEN_INDEX
        from llava.mm_utils import tokenizer_image_token

        return tokenizer_image_token(text, self.tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")

    def _images(self, images: Sequence[Image.Image]):
        from llava.mm_utils import process_images

        if not images:
            return None, None
        images = [image.convert("RGB") for image in images]
        pixels = process_images(images, self.processor, self.model.config).to(self.device, dtype=self.model.dtype)
        return pixels, [image.size for image in images]

    @torch.no_grad()
    def generate(
        self, contexts: Sequence[str], images: Sequence[Sequence[Image.Image]], settings: GenerationSettings
    ) -> list[str]:
        rows = [self._ids(self.prompt(context, len(row))) for context, row in zip(contexts, images, strict=True)]
        width = max(len(row) for row in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for index, row in enumerate(rows):  # left padding
            input_ids[index, width - len(row) :] = row
            attention_mask[index, width - len(row) :] = 1
        pixels, sizes = self._images([image for row in images for image in row])
        output = self.model.generate(
            input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            images=pixels,
            image_sizes=sizes,
            pad_token_id=pad,
            use_cache=True,
            **settings.generate_kwargs(),
        )
        return [settings.cut(text).strip() for text in self.tokenizer.batch_decode(output, skip_special_tokens=True)]

    @torch.no_grad()
    def loglikelihood(self, context: str, continuation: str, images: Sequence[Image.Image]) -> tuple[float, bool]:
        prompt = self.prompt(context, len(images))
        full = self._ids(prompt + continuation)[None].to(self.device)
        prefix = len(self._ids(prompt))
        labels = full.clone()
        labels[:, :prefix] = IGNORE_INDEX
        pixels, sizes = self._images(list(images))
        _, position_ids, attention_mask, _, embeddings, labels = self.model.prepare_inputs_labels_for_multimodal(
            full, None, torch.ones_like(full), None, labels, pixels, sizes
        )
        logits = self.model(inputs_embeds=embeddings, attention_mask=attention_mask, position_ids=position_ids).logits
        return score_continuation(logits, labels)
