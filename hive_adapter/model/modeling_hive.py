"""`HiveForConditionalGeneration`: a vision encoder and a causal LM composed into one HF model.

The paper's setting (pre-training a vision encoder with an LLM): any HF vision encoder (CLIP, SigLIP,
SigLIP2, DINOv2, ...) plus any decoder-only LM (Llama, Qwen2/3, Mistral, Gemma, ...), with HIVE
cross-attention in between. It is a regular `PreTrainedModel`: `save_pretrained` writes
`config.json` (`model_type: "hive"`) + `model.safetensors`, and after `import hive_adapter`
`AutoModel.from_pretrained(dir)` loads it back without `trust_remote_code`. The vision encoder stays a
plain HF model under `vision_model`, so exporting it after pre-training is `vision_model.save_pretrained`.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, PreTrainedModel
from transformers.generation import GenerationMixin

from .builders import init_hive_module
from .config import HiveConfig
from .mixin import HiveMixin, hold_reference
from .parameters import check_finite

logger = logging.getLogger(__name__)

TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5

# hive-adapter 0.1 wrapped each chosen decoder layer: its checkpoints hold the layer's own weights under
# `language_model....layers.N.base_layer.` and the block under `language_model....layers.N.hive_block.`.
# Today the language model keeps its names and block N lives at `hive_blocks.N.`.
LEGACY_KEY_MAPPING = {
    r"^language_model\..*\.(\d+)\.hive_block\.": r"hive_blocks.\1.",
    r"\.base_layer\.": ".",
}


class HivePreTrainedModel(PreTrainedModel):
    config_class = HiveConfig
    base_model_prefix = ""  # composite: no inner "base model" (a "hive" prefix would match hive_levels.* keys)
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    # The vision encoder's and the language model's own units are added by transformers from the sub-models.
    _no_split_modules = ["HiveLevelEncoder", "HiveCrossAttentionBlock"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flash_attn_2 = True
    _supports_cache_class = True
    # Gates and norms stay float32 under bf16 and fp16 alike (tiny, numerically sensitive); the FFN's are
    # added by instances built with `use_ffn=True`.
    _keep_in_fp32_modules_strict = ["hive_attn_gate", "hive_attn_norm", "hive_media_norm"]
    _hive_ffn_fp32_modules = ["hive_ffn_gate", "hive_ffn_norm"]

    def _init_weights(self, module: nn.Module) -> None:
        """Every module that reaches this is HIVE's: transformers initialises the vision encoder and the
        language model with their own `_init_weights`."""
        init_hive_module(module, self.config)

    @classmethod
    def is_custom_code(cls) -> bool:
        """transformers takes classes defined outside it for remote code that may write weights in place, and
        then, in every sub-model too, skips modules without tensors of their own: CLIP's and SigLIP's attention
        layers would be initialised otherwise than by the encoder itself. HIVE's `_init_weights` leaves loaded
        tensors alone (`_is_hf_initialized`) as transformers' own models do, so it needs no such caution."""
        return False


class HiveForConditionalGeneration(HiveMixin, HivePreTrainedModel, GenerationMixin):
    """Vision encoder + causal LM + HIVE, one Hugging Face model (`model_type="hive"`).

    `AutoModel`, `AutoModelForImageTextToText` and `pipeline("image-text-to-text")` load a saved one (after
    `import hive_adapter`, no `trust_remote_code`). Compose one from existing models with `from_vision_text`.

    Args:
        config (`HiveConfig`): with `vision_config` and `text_config` set (the two models' configs).
        vision_model (`PreTrainedModel`, *optional*): the encoder to use instead of one built from `vision_config`.
        language_model (`PreTrainedModel`, *optional*): the causal LM to use instead of one built from
            `text_config`.
    """

    def __init__(
        self,
        config: HiveConfig,
        *,
        vision_model: PreTrainedModel | None = None,
        language_model: PreTrainedModel | None = None,
    ):
        if config.vision_config is None or config.text_config is None:
            raise ValueError(
                "HiveForConditionalGeneration needs HiveConfig(vision_config=..., text_config=...); to add HIVE to an "
                "existing vision-language model use get_hive_model(model, HiveConfig(...)) instead"
            )
        super().__init__(config)
        self.vision_model = vision_model if vision_model is not None else AutoModel.from_config(config.vision_config)
        self.language_model = (
            language_model if language_model is not None else AutoModelForCausalLM.from_config(config.text_config)
        )
        if self.language_model.get_output_embeddings() is None:
            raise ValueError(
                f"language_model is a {type(self.language_model).__name__} without an LM head; pass a causal LM "
                "(e.g. LlamaForCausalLM, Qwen2ForCausalLM)"
            )
        self._init_hive(
            config=config,
            vision_tower=self.vision_model,
            vision_config=config.vision_config,
            language_root=self.language_model,
            text_config=config.text_config,
            image_token_id=config.image_token_id,
        )
        if config.use_ffn:
            self._keep_in_fp32_modules_strict = [*self._keep_in_fp32_modules_strict, *self._hive_ffn_fp32_modules]
        self.post_init()
        # post_init merged the sub-models' lists, which name classes these sub-models may not contain (SigLIP's
        # lists its text embeddings); FSDP's default wrapping and device maps take only what is here.
        present = {type(module).__name__ for module in self.modules()}
        self._no_split_modules = {name for name in self._no_split_modules if name in present}

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any):
        """`PreTrainedModel.from_pretrained`, also reading checkpoints written by hive-adapter 0.1 (wrapped
        decoder layers, see `LEGACY_KEY_MAPPING`; they are saved again under today's names), and refusing
        HIVE weights that hold NaN or inf."""
        source = str(args[0] if args else kwargs.get("pretrained_model_name_or_path"))
        if TRANSFORMERS_5:
            kwargs["key_mapping"] = {**LEGACY_KEY_MAPPING, **(kwargs.get("key_mapping") or {})}
        else:
            _refuse_legacy_checkpoint(source)
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        # transformers keeps the renamings it used, to write them back on save; these must not be.
        model._weight_conversions = [
            conversion
            for conversion in getattr(model, "_weight_conversions", None) or []
            if not set(getattr(conversion, "_original_source_patterns", ())) & set(LEGACY_KEY_MAPPING)
        ]
        check_finite(model.hive_named_parameters(), source=source)
        return loaded

    def save_pretrained(self, save_directory, *args: Any, **kwargs: Any):
        """`PreTrainedModel.save_pretrained`, refusing a path that is a file (transformers only logs it)."""
        if Path(save_directory).exists() and not Path(save_directory).is_dir():
            raise ValueError(f"save_pretrained({str(save_directory)!r}): that is a file; give a directory")
        return super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def from_vision_text(
        cls,
        vision_model: PreTrainedModel,
        language_model: PreTrainedModel,
        config: HiveConfig | None = None,
        **overrides: Any,
    ) -> HiveForConditionalGeneration:
        """Compose existing (e.g. pretrained) models; their weights are kept, only HIVE's are new.

        Args:
            vision_model (`PreTrainedModel`): a vision encoder (CLIP, SigLIP, SigLIP2, DINOv2, Qwen2.5-VL's ViT, ...).
            language_model (`PreTrainedModel`): a decoder-only causal LM (Llama, Qwen2/3, Mistral, Gemma-2, ...).
            config (`HiveConfig`, *optional*): the HIVE settings (copied; its sub-configs are set from the models).
            **overrides: `HiveConfig` fields instead of `config`.

        Returns:
            `HiveForConditionalGeneration`: the composed model on the language model's device and dtype; with the
            gates at 0 it computes exactly what `language_model` computes.

        Raises:
            ValueError: both `config` and `overrides`, or settings that do not fit the two models (named).

        Example:
            ```python
            model = HiveForConditionalGeneration.from_vision_text(encoder, llm, HiveConfig(vision_layers=[1, 3, 5, 7]))
            model.save_pretrained("my-hive")  # AutoModel.from_pretrained("my-hive") loads it back
            ```
        """
        if config is None:
            config = HiveConfig(**overrides)
        elif overrides:
            raise ValueError(f"pass either a HiveConfig or keyword overrides, not both (got {sorted(overrides)})")
        else:
            config = copy.deepcopy(config)
        config.vision_config = vision_model.config
        config.text_config = language_model.config
        config.validate()
        model = cls(config, vision_model=vision_model, language_model=language_model)
        reference = next(language_model.parameters())
        model.hive_place_modules(device=reference.device, dtype=reference.dtype)
        return model

    # ------------------------------------------------------------------ embeddings (GenerationMixin, resizing)
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    def get_decoder(self) -> nn.Module:
        return self.language_model.get_decoder()

    @property
    def base_model(self) -> nn.Module:
        """The model without its LM head (`HiveBackbone`), as transformers' composite models expose theirs
        (`LlavaForConditionalGeneration.model`): the same inputs as `forward`, `last_hidden_state` out. TRL's
        fused LM head (`SFTTrainer`) runs it and applies `get_output_embeddings()` itself. Built on each access,
        so it follows modules that were replaced (PEFT, FSDP)."""
        return HiveBackbone(self)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ):
        """The language model's forward, with the images seen through HIVE's cross-attention.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch, text)`, *optional*): the text; one marker per image in
                marker mode, none in captioning mode (one image per sample).
            pixel_values (`torch.Tensor`, *optional*): the images, `(images, 3, H, W)` in marker order.
            attention_mask (`torch.Tensor`, *optional*): 1 for real tokens.
            labels (`torch.LongTensor`, *optional*): targets for the LM loss (-100 ignored).
            past_key_values (*optional*): the cache of earlier steps (generation).
            inputs_embeds (`torch.Tensor`, *optional*): instead of `input_ids`; the markers are then found where an
                embedding row equals the marker token's.
            **kwargs: the language model's other arguments (`position_ids`, `use_cache`, ...).

        Returns:
            `CausalLMOutputWithPast`: the language model's output (`loss`, `logits`, `past_key_values`, ...).

        Raises:
            ValueError: the markers and the images do not match (named, with the counts per sample).
        """
        return self._hive_forward(
            self.language_model,
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            labels=labels,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ):
        """`GenerationMixin.generate` with the vision context built once per prompt.

        Args:
            input_ids (`torch.LongTensor`, *optional*): the prompts (left-padded for a batch).
            pixel_values (`torch.Tensor`, *optional*): their images, in marker order.
            attention_mask (`torch.Tensor`, *optional*): 1 for real tokens.
            **kwargs: every `generate` argument (greedy, sampling, beams, several sequences, the static cache).

        Returns:
            `torch.LongTensor`: the generated token ids (prompt included), as `GenerationMixin.generate` returns.
        """
        return self._hive_generate(
            super().generate,
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            **kwargs,
        )

    def export_vision_model(self) -> PreTrainedModel:
        """The vision encoder as the plain HF model it is (what `hive-export-vision` writes).

        Returns:
            `PreTrainedModel`: the encoder itself (not a copy), with the weights stage 3 trained.
        """
        return self.vision_model


class HiveBackbone(nn.Module):
    """`HiveForConditionalGeneration` without its LM head: the vision side, HIVE's modules and the language
    model's decoder stack, returning the decoder's output (`last_hidden_state`, ...). Its children are the
    model's own modules (nothing is copied; it is not registered in the model, so checkpoints are unchanged).

    One hidden state per input column for every connector: `concat`, which splices the images' tokens into the
    sequence, gathers its hidden states back to the input's columns (`Connector.hidden_states`), so that they
    line up with the caller's labels.
    """

    _tp_plan = None  # read by `PreTrainedModel.supports_tp_plan` / `supports_pp_plan` through `base_model`
    _pp_plan = None

    def __init__(self, model: HiveForConditionalGeneration):
        super().__init__()
        self.vision_model = model.vision_model
        self.decoder = model.language_model.get_decoder()
        self.hive_levels = model.hive_levels
        self.hive_blocks = model.hive_blocks
        hold_reference(self, "_hive_model", model)  # a view of `model`, not a second copy of its names

    @property
    def config(self) -> HiveConfig:
        return self._hive_model.config

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ):
        return self._hive_model._hive_hidden_states(
            self.decoder,
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )


def _refuse_legacy_checkpoint(path: str) -> None:
    """transformers < 5 cannot rename keys while loading: name the problem instead of loading HIVE at random."""
    weights = Path(path) / "model.safetensors"
    if not weights.is_file():
        return
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as checkpoint:
        legacy = [key for key in checkpoint.keys() if ".hive_block." in key or ".base_layer." in key]
    if legacy:
        raise ValueError(
            f"{weights} was written by hive-adapter 0.1 (keys such as {legacy[0]!r}); transformers "
            f"{transformers.__version__} cannot rename them while loading. Load it once with transformers >= 5 "
            "and save it again (model.save_pretrained), then it loads here."
        )


def _register_auto_classes() -> None:
    """`AutoConfig` / `AutoModel` / image-text-to-text / causal-LM know `model_type="hive"` after import."""
    import transformers

    try:
        transformers.AutoConfig.register("hive", HiveConfig, exist_ok=True)
    except TypeError:  # transformers without `exist_ok`
        if "hive" not in transformers.models.auto.configuration_auto.CONFIG_MAPPING:
            transformers.AutoConfig.register("hive", HiveConfig)
    for auto_name in ("AutoModel", "AutoModelForImageTextToText", "AutoModelForVision2Seq", "AutoModelForCausalLM"):
        auto_class = getattr(transformers, auto_name, None)
        if auto_class is None:  # older transformers lack some auto classes
            continue
        try:
            auto_class.register(HiveConfig, HiveForConditionalGeneration, exist_ok=True)
        except TypeError:
            auto_class.register(HiveConfig, HiveForConditionalGeneration)
        except ValueError:  # already registered by an earlier import
            pass
