"""`HiveModel`: HIVE as a PEFT-style adapter around an existing vision-language model.

    model = get_hive_model(base, HiveConfig(...))   # base frozen, HIVE modules trainable
    model.save_pretrained("adapter/")                # hive_config.json + hive_adapter.safetensors
    again = HiveModel.from_pretrained(base2, "adapter/")
    base = model.unload()                            # the same modules, flags and weights as before

Follows PEFT's `PeftModel` in spirit (wrapper that forwards attribute access to the base, adapter-only
checkpoints, `print_trainable_parameters`) with one documented file layout, strict loading
(docs/ARCHITECTURE.md §7.4: a missing or unexpected HIVE key is an error, never `strict=False` silence) and safetensors only.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..utils.outputs import write_file
from .architectures import find_vision_tower, image_token_id_of, text_config_of
from .builders import init_hive_weights
from .config import HiveConfig
from .connectors import connector_for
from .mixin import HiveMixin
from .parameters import check_finite, count_parameters, is_hive_parameter, mark_hive_trainable, numel

logger = logging.getLogger(__name__)

ADAPTER_CONFIG_NAME = "hive_config.json"
ADAPTER_WEIGHTS_NAME = "hive_adapter.safetensors"


class HiveModel(HiveMixin, nn.Module):
    """A base vision-language model with HIVE cross-attention inserted (the PEFT-style adapter).

    Attribute access falls through to the base model (`model.config`, `model.language_model`, ...); the base's
    decoder layers keep their names, HIVE's modules live beside them (`hive_levels.*`, `hive_blocks.*`). Build it
    with `get_hive_model`; reload a saved adapter with `HiveModel.from_pretrained(base, directory)`.

    Args:
        base_model (`nn.Module`): a vision-language model whose vision tower and decoder layers HIVE can find
            (llava-hf's `LlavaForConditionalGeneration` and the families in the guide's table).
        config (`HiveConfig`): which encoder layers feed which decoder layers, and how.
        freeze_base (`bool`, defaults to `True`): freeze every base parameter (`unload()` restores the flags).

    Raises:
        ValueError: `base_model` is already a `HiveModel`, or `config` does not fit the base (a layer out of
            range, a width the cross-attention cannot take), named with what to change.
    """

    def __init__(self, base_model: nn.Module, config: HiveConfig, *, freeze_base: bool = True):
        super().__init__()
        if isinstance(base_model, HiveModel):
            raise ValueError("this model is already a HiveModel; unload() it before wrapping it again")
        self.base_model = base_model
        connector_for(config.connector).check_base(base_model)
        self._original_requires_grad = {name: p.requires_grad for name, p in base_model.named_parameters()}
        tower = find_vision_tower(base_model, config.vision_tower_path)
        base_config = getattr(base_model, "config", None)
        image_token_id = config.image_token_id
        if image_token_id is None and base_config is not None:
            image_token_id = image_token_id_of(base_config)
        self._init_hive(
            config=config,
            vision_tower=tower,
            vision_config=tower.config,
            language_root=base_model,
            text_config=text_config_of(base_config),
            image_token_id=image_token_id,
            family_config=base_config,
        )
        if image_token_id is not None and config.image_token_id is None:
            logger.info("HIVE: using the base model's image token id %d as the image marker", image_token_id)
        for module in self.hive_top_modules():
            init_hive_weights(module, config)
        reference = next(base_model.parameters())
        self.hive_place_modules(device=reference.device, dtype=reference.dtype)
        if freeze_base:
            for param in base_model.parameters():
                param.requires_grad_(False)
        mark_hive_trainable(self)

    # ------------------------------------------------------------------ nn.Module plumbing
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # ------------------------------------------------------------------ forward / generate
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ):
        """The base model's forward with the images seen through HIVE, never spliced into the token sequence.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch, text)`): the text, with one image marker per image in
                marker mode (`image_token_id`), none in captioning mode.
            pixel_values (`torch.Tensor`, *optional*): the images in the base's own pixel format, in marker order.
            attention_mask (`torch.Tensor`, *optional*): as for the base.
            labels (`torch.LongTensor`, *optional*): as for the base; the loss is the base's.
            **kwargs: every other argument of the base's forward (`inputs_embeds`, `past_key_values`, ...).

        Returns:
            `ModelOutput`: the base model's output (`loss`, `logits`, ...).

        Raises:
            ValueError: the markers and the images do not match (named, with the counts per sample).
        """
        return self._hive_forward(
            self.base_model,
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            labels=labels,
            **kwargs,
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ):
        """`base.generate` with the images seen through HIVE (vision K/V computed once per prompt).

        Args:
            input_ids (`torch.LongTensor`, *optional*): the prompts (left-padded for a batch).
            pixel_values (`torch.Tensor`, *optional*): their images, in marker order.
            attention_mask (`torch.Tensor`, *optional*): as for the base.
            **kwargs: every `generate` argument (`max_new_tokens`, `do_sample`, `num_beams`, ...).

        Returns:
            `torch.LongTensor`: the generated token ids, as the base's `generate` returns them.
        """
        return self._hive_generate(
            self.base_model.generate,
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            **kwargs,
        )

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs: Any) -> None:
        """Checkpoint the base's layers and HIVE's blocks (vision K/V passed explicitly, any reentrancy)."""
        enable = getattr(self.base_model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs=gradient_checkpointing_kwargs, **kwargs)
        else:
            self.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)

    activation_checkpointing_enable = gradient_checkpointing_enable

    # ------------------------------------------------------------------ parameters
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """`(trainable, total)` parameter counts (ZeRO-3 partitions counted whole), as PEFT's method of the name."""
        return count_parameters(self.named_parameters())

    def print_trainable_parameters(self) -> None:
        """Print the trainable and total parameter counts and HIVE's own, as PEFT's method of the name does."""
        trainable, total = count_parameters(self.named_parameters())
        hive = sum(numel(p) for _, p in self.hive_named_parameters())
        print(
            f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"
            f" || HIVE params: {hive:,}"
        )

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, save_directory: str | os.PathLike, *, state_dict: dict | None = None) -> None:
        """Write the adapter only: `hive_config.json` and `hive_adapter.safetensors`.

        Under ZeRO-3 pass the gathered `state_dict` (e.g. from `deepspeed.zero.GatheredParameters`), or the
        partitioned (empty) tensors are refused rather than written.

        Args:
            save_directory (`str` or `os.PathLike`): the adapter's directory (created if missing).
            state_dict (`dict`, *optional*): the tensors to write instead of the model's own HIVE tensors.

        Raises:
            ValueError: `save_directory` is a file, or a HIVE tensor is empty (ZeRO-3 partitioned).
        """
        directory = Path(save_directory)
        if directory.exists() and not directory.is_dir():
            raise ValueError(f"save_pretrained({str(directory)!r}): that is a file; give a directory for the adapter")
        directory.mkdir(parents=True, exist_ok=True)
        weights = state_dict if state_dict is not None else self.hive_state_dict()
        weights = {name: tensor for name, tensor in weights.items() if is_hive_parameter(name)}
        empty = [name for name, tensor in weights.items() if tensor.numel() == 0]
        if empty:
            raise ValueError(
                f"refusing to save empty HIVE tensors {empty[:3]}...: under ZeRO-3 gather the parameters first"
            )
        tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in weights.items()}
        metadata = {"format": "pt", **{key: str(value) for key, value in self.hive_base_shape().items()}}
        write_file(directory / ADAPTER_WEIGHTS_NAME, lambda path: save_file(tensors, str(path), metadata=metadata))
        config = self.hive_config.adapter_dict()
        write_file(directory / ADAPTER_CONFIG_NAME, lambda path: path.write_text(json.dumps(config, indent=2)))
        logger.info("HIVE adapter (%d tensors) saved to %s", len(tensors), directory)

    @classmethod
    def from_pretrained(
        cls, base_model: nn.Module, adapter_directory: str | os.PathLike, *, is_trainable: bool = False
    ) -> HiveModel:
        """Wrap `base_model` with the adapter saved in `adapter_directory` (strict: every key must match).

        Args:
            base_model (`nn.Module`): the base the adapter was trained on (same widths and depths).
            adapter_directory (`str` or `os.PathLike`): what `save_pretrained` wrote.
            is_trainable (`bool`, defaults to `False`): keep HIVE's parameters trainable (to go on training).

        Returns:
            `HiveModel`: the wrapped base with the adapter's weights.

        Raises:
            FileNotFoundError: the directory holds no `hive_config.json` or `hive_adapter.safetensors`.
            ValueError: the adapter was trained on a base of another depth or width, a key is missing or
                unexpected, or a tensor holds NaN or inf (named).

        Example:
            ```python
            model = HiveModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(...), "adapter/")
            ```
        """
        directory = Path(adapter_directory)
        config = load_adapter_config(directory)
        model = cls(base_model, config)
        model.load_adapter_weights(directory / ADAPTER_WEIGHTS_NAME)
        if not is_trainable:
            mark_hive_trainable(model, False)
        return model

    def hive_base_shape(self) -> dict[str, int]:
        """What an adapter depends on in its base: widths and depths (saved with the weights, checked on load)."""
        return {
            "hive_text_hidden_size": self.hive_text_shape.hidden_size,
            "hive_vision_hidden_size": self.hive_vision_shape.hidden_size,
            "hive_text_num_layers": self.hive_text_shape.num_layers,
            "hive_vision_num_layers": self.hive_vision_shape.num_layers,
        }

    def load_adapter_weights(self, path: str | os.PathLike) -> None:
        """Load a `hive_adapter.safetensors` into this model, strictly.

        Raises:
            FileNotFoundError: no file at `path`.
            ValueError: the file was written for a base of another depth or width, or its keys do not match.
        """
        if not Path(path).is_file():
            raise FileNotFoundError(f"no HIVE adapter weights at {path}")
        with safe_open(str(path), framework="pt") as weights:
            saved = weights.metadata() or {}
        what = {
            "hive_text_num_layers": "language model layers",
            "hive_vision_num_layers": "vision encoder layers",
            "hive_text_hidden_size": "language model width",
            "hive_vision_hidden_size": "vision encoder width",
        }
        for key, value in self.hive_base_shape().items():
            if key in saved and int(saved[key]) != value:
                raise ValueError(
                    f"the adapter at {path} was trained on a base with {saved[key]} {what[key]}, this base has "
                    f"{value}; load it onto the base it was trained for"
                )
        load_hive_state_dict(self, load_file(str(path)), source=str(path))

    # ------------------------------------------------------------------ unload
    def unload(self) -> nn.Module:
        """Remove HIVE and return the base model with its original modules and `requires_grad` flags.

        Returns:
            `nn.Module`: the base model, computing bit for bit what it computed before it was wrapped (or, after
            a PEFT merge, with exactly the merged weights).
        """
        self._remove_hive()
        base = self.base_model
        for name, param in base.named_parameters():
            param.requires_grad_(self._original_requires_grad.get(name, param.requires_grad))
        return base


def get_hive_model(base_model: nn.Module, config: HiveConfig | None = None, **overrides: Any) -> HiveModel:
    """Insert zero-gated HIVE cross-attention into `base_model`; the base is frozen, HIVE trains.

    The gates start at 0, so the wrapped model computes exactly what the base computed until HIVE has trained.

    Args:
        base_model (`nn.Module`): a vision-language model (llava-hf's `LlavaForConditionalGeneration`, Qwen2.5-VL,
            SmolVLM, ...): HIVE finds its vision tower and decoder layers.
        config (`HiveConfig`, *optional*): the HIVE settings; by default every field's default.
        **overrides: `HiveConfig` fields instead of `config` (`get_hive_model(base, vision_layers=[1, 3])`).

    Returns:
        `HiveModel`: the wrapped model; `save_pretrained` writes the adapter only, `unload()` gives the base back.

    Raises:
        ValueError: both `config` and `overrides` given, a `HiveConfig` field that does not exist or has a bad
            value, or settings that do not fit the base (each named, with what to do).

    Example:
        ```python
        import hive_adapter as hive

        model = hive.get_hive_model(base, hive.HiveConfig(vision_layers=[1, 3, 5, 7], llm_layers=[0, 2, 4, 6]))
        model.print_trainable_parameters()
        ```
    """
    if config is None:
        config = HiveConfig(**overrides)
    elif overrides:
        raise ValueError(f"pass either a HiveConfig or keyword overrides, not both (got {sorted(overrides)})")
    return HiveModel(base_model, config)


def load_adapter_config(directory: str | os.PathLike) -> HiveConfig:
    path = Path(directory) / ADAPTER_CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {ADAPTER_CONFIG_NAME} in {directory}: not a HIVE adapter directory")
    try:
        values = json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(values, dict):
        raise ValueError(f"{path}: holds a JSON {type(values).__name__}, expected an object of HiveConfig fields")
    model_type = values.pop("model_type", "hive")
    if model_type != "hive":
        raise ValueError(f"{path}: model_type={model_type!r}, expected 'hive'")
    return HiveConfig(**values)


# Adapters written by hive-adapter 0.1 named block N after the decoder layer it wrapped.
LEGACY_BLOCK_NAME = re.compile(r"^.*\.(\d+)\.hive_block\.")


def load_hive_state_dict(model: nn.Module, loaded: dict[str, torch.Tensor], *, source: str) -> None:
    """Copy HIVE weights into `model`; fail on missing, unexpected or mis-shaped keys."""
    loaded = {LEGACY_BLOCK_NAME.sub(r"hive_blocks.\1.", name): tensor for name, tensor in loaded.items()}
    own = dict(model.hive_named_parameters())
    missing = sorted(set(own) - set(loaded))
    unexpected = sorted(set(loaded) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"HIVE weights in {source} do not match this model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}"
            f" ({len(missing)}), unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''} ({len(unexpected)})."
            " Was the adapter saved for another base model or HiveConfig?"
        )
    for name, param in own.items():
        tensor = loaded[name]
        if tuple(tensor.shape) != tuple(param.shape):
            raise ValueError(
                f"HIVE weight {name} in {source} has shape {tuple(tensor.shape)}, this model expects "
                f"{tuple(param.shape)}: the adapter was trained for a base model of different width"
            )
    check_finite(loaded.items(), source=source)
    for name, param in own.items():
        with torch.no_grad():
            param.copy_(loaded[name].to(device=param.device, dtype=param.dtype))
