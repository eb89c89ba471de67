"""Images in, per-request encoder input out: HIVE's multimodal processing in vLLM's encoder-decoder form.

The *decoder* prompt is the prompt itself, image markers included, exactly as `HiveProcessor` tokenizes it for
transformers (an image takes no sequence position). The *encoder* prompt is vLLM's bookkeeping for the images:
`tokens_per_image` placeholder ids per image, the length of each HIVE block's cross-attention K/V. The pixels are
`HiveProcessor`'s own (its image processor), so both sides see the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseProcessingInfo,
    EncDecMultiModalProcessor,
    PromptReplacement,
    PromptUpdate,
)

from hive_adapter.model.architectures import vision_shape_of

# vLLM's encoder-decoder scheduler keeps every encoder input at the start of the encoder prompt (offset 0): one
# image per request (vllm/v1/core/sched/scheduler.py, "Encoder input should be processed at the beginning of the
# sequence when encoder-decoder models are used").
MAX_IMAGES_PER_PROMPT = 1
CAPTIONING_PLACEHOLDER = 0  # the encoder prompt's filler id when the model has no marker token


def tokens_per_image(config) -> int:
    """Vision tokens each HIVE block reads per image: the patch grid, pooled to `tokens_per_level` if set."""
    if config.vision_feature_select != "patch":
        raise ValueError(
            f"vision_feature_select={config.vision_feature_select!r}: the vLLM plugin serves 'patch' models only "
            "(the tokens in front of the patch grid are not counted here)"
        )
    shape = vision_shape_of(config.vision_config)
    grid = shape.image_size // shape.patch_size
    if config.tokens_per_level is None:
        return grid * grid
    side = min(math.isqrt(config.tokens_per_level), grid)
    return side * side


class HiveProcessingInfo(BaseProcessingInfo):
    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": MAX_IMAGES_PER_PROMPT}

    @property
    def skip_prompt_length_check(self) -> bool:
        return True  # the encoder prompt is placeholders, not text

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {"image": tokens_per_image(self.get_hf_config())}

    def marker(self) -> int | None:
        return self.get_hf_config().image_token_id

    def placeholder(self) -> int:
        marker = self.marker()
        return CAPTIONING_PLACEHOLDER if marker is None else int(marker)

    def image_size(self) -> int:
        return vision_shape_of(self.get_hf_config().vision_config).image_size


class HiveDummyInputsBuilder(BaseDummyInputsBuilder[HiveProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        marker = self.info.marker()
        if marker is None:
            return ""
        token = self.info.get_tokenizer().convert_ids_to_tokens(int(marker))
        return token * mm_counts.get("image", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options):
        size = self.info.image_size()
        overrides = mm_options.get("image") if mm_options else None
        return {
            "image": self._get_dummy_images(
                width=size, height=size, num_images=mm_counts.get("image", 0), overrides=overrides
            )
        }


class HiveMultiModalProcessor(EncDecMultiModalProcessor[HiveProcessingInfo]):
    # The prompt is the language model's own, BOS included where the chat template puts it: nothing is prepended.
    skip_decoder_start_token = True

    def _get_hf_mm_text(self, mm_counts: Mapping[str, int]) -> str:
        # HiveProcessor checks one marker per image (marker mode) or one image per text (captioning).
        return self.dummy_inputs.get_dummy_text(mm_counts)

    def create_decoder_prompt(self, prompt, mm_items):
        """The prompt itself; in marker mode refused unless it holds one marker per image (what `HiveProcessor`
        checks in transformers: a marker-less image would be seen by the generated tokens only)."""
        marker = self.info.marker()
        if marker is None:
            return prompt
        tokenizer = self.info.get_tokenizer()
        ids = prompt if isinstance(prompt, list) else tokenizer.encode(prompt, add_special_tokens=False)
        markers, images = ids.count(int(marker)), mm_items.get_count("image", strict=False)
        if markers != images:
            token = tokenizer.convert_ids_to_tokens(int(marker))
            raise ValueError(
                f"the prompt holds {markers} image markers {token!r} but {images} images were given. Put one "
                f"{token!r} where each image goes (chat requests: serve with --chat-template-content-format openai, "
                "so that the model's chat template writes them)"
            )
        return prompt

    def create_encoder_prompt(self, prompt, mm_items) -> list[int]:
        return [self.info.placeholder()] * mm_items.get_count("image", strict=False)

    def _hf_processor_applies_updates(self, *args, **kwargs) -> bool:
        return False

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs) -> Mapping[str, MultiModalFieldConfig]:
        return {"pixel_values": MultiModalFieldConfig.batched("image")}

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs) -> Sequence[PromptUpdate]:
        placeholder = self.info.placeholder()
        count = tokens_per_image(self.info.get_hf_config())
        return [PromptReplacement(modality="image", target=[placeholder], replacement=[placeholder] * count)]
