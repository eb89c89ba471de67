"""The handlers: the few places where the LLaVA repo hands control to HIVE.

Both ways of adding HIVE to LLaVA call exactly these functions: `apply_patch()` wraps LLaVA's own
functions at import time, and `patches/llava/*.patch` edits a LLaVA checkout to call them. Each one
does nothing unless the model's connector is HIVE (`--vision_connector hive` or `cascaded`), so with
the default `--vision_connector mlp` LLaVA runs exactly as upstream.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...model.parameters import numel
from ...training.hive_flags import HiveArguments, hive_config_from
from .modules import HiveLlavaModules, hive_modules_of
from .settings import (
    FEATURE_SELECT,
    PROJECTOR_TYPE,
    add_projector_settings,
    hive_llava_settings,
    settings_in_adapter_file,
)

logger = logging.getLogger(__name__)

HIVE_CONNECTORS = ("hive", "cascaded")
# Parameter-name parts of HIVE's float32 tensors (gates and norms: `cross_attention.KeepsFloat32`).
FLOAT32_MODULES = ("hive_attn_gate", "hive_ffn_gate", "hive_attn_norm", "hive_media_norm", "hive_ffn_norm")
LLAVA_CONNECTORS = ("mlp", *HIVE_CONNECTORS)


@dataclasses.dataclass
class LlavaHiveArguments(HiveArguments):
    """The `--vision_connector` / `--hive_*` flags, added to LLaVA's `ModelArguments`."""

    vision_connector: str = dataclasses.field(
        default="mlp",
        metadata={
            "help": "mlp: LLaVA's own connector (--mm_projector_type), unchanged. hive: HIVE's hierarchical "
            "cross-attention (image tokens never enter the LLM sequence). cascaded: the same cross-attention fed "
            "by the deepest level only (the paper's baseline)."
        },
    )


@dataclasses.dataclass
class LlavaHiveTrainingArguments:
    """Added to LLaVA's `TrainingArguments`."""

    unfreeze_vision_tower: bool = dataclasses.field(
        default=False,
        metadata={"help": "Train the vision tower too (HIVE stage 3). Needs --vision_connector hive."},
    )


def uses_hive(model_args) -> bool:
    connector = getattr(model_args, "vision_connector", "mlp")
    if connector not in LLAVA_CONNECTORS:
        raise ValueError(f"--vision_connector {connector!r}: expected one of {', '.join(LLAVA_CONNECTORS)}")
    return connector in HIVE_CONNECTORS


def build_projector(config) -> HiveLlavaModules | None:
    """LLaVA's `build_vision_projector` for `mm_projector_type == "hive"`; None for every other type."""
    if getattr(config, "mm_projector_type", None) != PROJECTOR_TYPE:
        return None
    if not isinstance(getattr(config, "hive_config", None), dict):
        raise ValueError(
            "mm_projector_type='hive' but the config has no `hive_config`; it was not written by hive-adapter"
        )
    return HiveLlavaModules(config)


# The LLaVA language-model classes HIVE runs in: their `generate` is routed to `handlers.generate` (patch.py and
# the patch file). LLaVA's Mistral and MPT classes are not: they would get HIVE's modules without HIVE's generate.
SUPPORTED_LLAVA_MODELS = {"LlavaLlamaModel": "llava.model.language_model.llava_llama"}


def check_supported(llava_model: nn.Module) -> None:
    """Refuse a LLaVA language model whose generation HIVE does not route (by class, from the table above)."""
    import importlib

    for name, module in SUPPORTED_LLAVA_MODELS.items():
        if isinstance(llava_model, getattr(importlib.import_module(module), name)):
            return
    raise ValueError(
        f"--vision_connector hive on {type(llava_model).__name__}: HIVE supports LLaVA's Llama models "
        f"({', '.join(SUPPORTED_LLAVA_MODELS)}) only; LLaVA's Mistral and MPT classes would get HIVE's modules "
        "without HIVE's generation. Use a Llama-family LLM (Vicuna, LLaMA), or the Hugging Face route "
        "(HiveForConditionalGeneration.from_vision_text) for Mistral"
    )


def attach(llava_model: nn.Module) -> None:
    """Hook a HIVE connector's blocks into the decoder layers (end of `LlavaMetaModel.__init__` and of
    `initialize_vision_modules`)."""
    modules = getattr(llava_model, "mm_projector", None)
    if isinstance(modules, HiveLlavaModules):
        check_supported(llava_model)
        modules.attach(llava_model)


def loaded(model: nn.Module, pretrained_model_name_or_path, **kwargs) -> None:
    """End of LLaVA's `from_pretrained`: a HIVE connector saved with its blocks named by position (before they
    were named by decoder layer) is loaded again by decoder layer, on the paths where transformers loaded it by
    name (`legacy.py`)."""
    if hive_modules_of(model) is not None:
        from .legacy import reload_blocks_saved_by_position

        reload_blocks_saved_by_position(model, pretrained_model_name_or_path, **kwargs)


def _changed_settings(wanted: dict[str, Any], existing: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    return {key: (existing.get(key), value) for key, value in wanted.items() if existing.get(key) != value}


def configure(llava_model: nn.Module, model_args) -> None:
    """Start of `initialize_vision_modules`: make the connector LLaVA is about to build a HIVE one.

    Writes `config.mm_projector_type = "hive"` and `config.hive_config` (the HIVE knobs and the vision
    tower's shape). A model that already has a connector (a reloaded checkpoint) keeps it, and a
    `--pretrain_mm_mlp_adapter` brings the settings it was trained with (its `config.json`); `--hive_*`
    flags given explicitly that contradict either stop with an error naming the differences.
    """
    if not uses_hive(model_args):
        if getattr(llava_model.config, "mm_projector_type", None) == PROJECTOR_TYPE:
            raise ValueError(
                "this checkpoint's connector is HIVE (mm_projector_type='hive'); pass --vision_connector hive to "
                "continue training it"
            )
        return
    from transformers import CLIPVisionConfig

    select = getattr(model_args, "mm_vision_select_feature", "patch")
    if select not in FEATURE_SELECT:
        raise ValueError(f"--mm_vision_select_feature {select!r}: HIVE supports {', '.join(FEATURE_SELECT)}")
    hive_config = hive_config_from(model_args, vision_feature_select=FEATURE_SELECT[select])
    tower = llava_model.get_vision_tower()
    vision_config = tower.config if tower is not None else CLIPVisionConfig.from_pretrained(model_args.vision_tower)
    settings = hive_llava_settings(hive_config, vision_config, llava_model.config.num_hidden_layers)

    defaults = _default_settings(vision_config, llava_model.config.num_hidden_layers)
    asked = {key: value for key, value in settings.items() if defaults.get(key) != value}  # flags given explicitly

    existing = getattr(llava_model, "mm_projector", None)
    if existing is not None:
        if not isinstance(existing, HiveLlavaModules):
            raise ValueError(
                f"--vision_connector {model_args.vision_connector}: this checkpoint already has LLaVA's "
                f"{getattr(llava_model.config, 'mm_projector_type', 'linear')!r} connector; start HIVE from the "
                "language model (stage 1) instead"
            )
        changed = _changed_settings(asked, llava_model.config.hive_config)
        if changed:
            raise ValueError(
                "the checkpoint's HIVE connector differs from the command line: "
                + ", ".join(f"{key}: checkpoint {old!r}, asked {new!r}" for key, (old, new) in changed.items())
                + ". Drop those --hive_* flags to keep the checkpoint's connector."
            )
        model_args.mm_projector_type = PROJECTOR_TYPE
        return

    adapter = getattr(model_args, "pretrain_mm_mlp_adapter", None)
    if adapter:
        saved = _adapter_settings(adapter)
        changed = _changed_settings(asked, saved)
        if changed:
            raise ValueError(
                f"--pretrain_mm_mlp_adapter {adapter} was trained with other HIVE settings: "
                + ", ".join(f"{key}: adapter {old!r}, asked {new!r}" for key, (old, new) in changed.items())
                + ". Drop those --hive_* flags to continue with the adapter's."
            )
        settings = saved  # the stage-1 connector, whatever flags it was trained with
    model_args.mm_projector_type = PROJECTOR_TYPE
    llava_model.config.hive_config = settings


def _adapter_settings(adapter: str) -> dict[str, Any]:
    """The HIVE settings an `mm_projector.bin` was trained with: saved inside it, else in the `config.json`
    beside it (adapters of hive-adapter 0.1); an error when neither says."""
    if not Path(adapter).is_file():
        raise FileNotFoundError(f"--pretrain_mm_mlp_adapter {adapter}: no such file")
    inside = settings_in_adapter_file(adapter)
    if inside is not None:
        logger.info("HIVE (LLaVA): connector settings from %s", adapter)
        return inside
    beside = Path(adapter).parent / "config.json"
    if not beside.is_file():
        raise ValueError(
            f"--pretrain_mm_mlp_adapter {adapter}: the file carries no HIVE settings and no config.json is beside "
            "it: it is LLaVA's own connector, or an adapter of hive-adapter 0.1 (then put the config.json it was "
            "saved with beside it)"
        )
    saved = json.loads(beside.read_text())
    if saved.get("mm_projector_type") != PROJECTOR_TYPE:
        raise ValueError(
            f"--pretrain_mm_mlp_adapter {adapter}: trained with mm_projector_type="
            f"{saved.get('mm_projector_type')!r}, not a HIVE connector"
        )
    logger.info("HIVE (LLaVA): connector settings from %s", beside)
    return saved["hive_config"]


def _default_settings(vision_config, num_llm_layers: int) -> dict[str, Any]:
    return hive_llava_settings(
        hive_config_from(LlavaHiveArguments(vision_connector="hive")), vision_config, num_llm_layers
    )


def prepare_inputs(model: nn.Module, *args, **kwargs):
    """`prepare_inputs_labels_for_multimodal` for a HIVE model, or None to let LLaVA's own run.

    Arguments as LLaVA's: input_ids, position_ids, attention_mask, past_key_values, labels, images,
    image_sizes.
    """
    modules = hive_modules_of(model)
    if modules is None:
        return None
    names = ("input_ids", "position_ids", "attention_mask", "past_key_values", "labels", "images", "image_sizes")
    values = dict(zip(names, args, strict=False))
    values.update(kwargs)
    values.pop("image_sizes", None)
    return modules.prepare_inputs(
        model.get_model(), padding_side=getattr(model.config, "tokenizer_padding_side", "right"), **values
    )


@torch.no_grad()
def generate(model: nn.Module, inputs: torch.Tensor | None = None, images=None, image_sizes=None, **kwargs):
    """`LlavaLlamaForCausalLM.generate` for a HIVE model; returns only the new tokens, as LLaVA's does.

    The prompt's markers are dropped, the images are encoded once and every block's K/V computed once;
    decoding then runs on text alone, with the prompt's context pinned (`HiveRuntime.generating`).
    """
    from transformers import GenerationMixin

    modules = hive_modules_of(model)
    if "inputs_embeds" in kwargs:
        raise NotImplementedError("`inputs_embeds` is not supported")
    if inputs is None:
        raise ValueError("generate() needs the prompt's token ids (with IMAGE_TOKEN_INDEX where each image goes)")
    position_ids = kwargs.pop("position_ids", None)
    attention_mask = kwargs.pop("attention_mask", None)
    text, context = modules.prompt(
        model.get_model(), inputs, position_ids, attention_mask, None, images, padding_side="left"
    )
    embeddings = model.get_model().embed_tokens(text.input_ids)
    return modules.runtime.generating(
        context,
        lambda: GenerationMixin.generate(
            model,
            position_ids=text.position_ids,
            attention_mask=text.attention_mask,
            inputs_embeds=embeddings,
            **kwargs,
        ),
    )


def prepare_for_training(model: nn.Module, training_args) -> None:
    """Just before LLaVA builds its trainer: unfreeze the vision tower for stage 3 and log what trains."""
    modules = hive_modules_of(model)
    if getattr(training_args, "unfreeze_vision_tower", False):
        if modules is None:
            raise ValueError(
                "--unfreeze_vision_tower needs --vision_connector hive: LLaVA's own connector runs the tower under "
                "torch.no_grad, so it would never receive a gradient"
            )
        if getattr(training_args, "tune_mm_mlp_adapter", False):
            raise ValueError(
                "--unfreeze_vision_tower with --tune_mm_mlp_adapter: adapter-only saving keeps mm_projector.bin "
                "alone and would drop the trained tower; unfreeze the tower in a full fine-tune (stage 3)"
            )
        encoder = model.get_vision_tower().vision_tower
        # LLaVA casts the tower to fp16 unless --bf16; a trained tower keeps the LLM's dtype (fp32 or bf16).
        encoder.to(dtype=model.get_input_embeddings().weight.dtype)
        encoder.requires_grad_(True)
        model.config.unfreeze_mm_vision_tower = True  # LLaVA then loads the trained tower from the checkpoint
    if modules is None:
        return
    counts = {"HIVE (mm_projector)": 0, "vision tower": 0, "language model": 0}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        part = (
            "HIVE (mm_projector)"
            if "mm_projector" in name
            else "vision tower"
            if "vision_tower" in name
            else "language model"
        )
        counts[part] += numel(parameter)
    logger.info("HIVE (LLaVA) trainable parameters: %s", ", ".join(f"{k} {v:,}" for k, v in counts.items()))


def maybe_zero_3(param, ignore_status: bool = False, name: str | None = None):
    """LLaVA's `maybe_zero_3`, importing DeepSpeed only for a ZeRO-3 parameter (runs without DeepSpeed), and
    gathering an FSDP2 shard (every rank calls it: LLaVA collects the adapter on all ranks, saves on one)."""
    if hasattr(param, "full_tensor"):
        return param.full_tensor().detach().cpu().clone()
    if hasattr(param, "ds_id"):
        from deepspeed import zero
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        if param.ds_status == ZeroParamStatus.NOT_AVAILABLE and not ignore_status:
            logger.warning("%s: param.ds_status != ZeroParamStatus.NOT_AVAILABLE: %s", name, param.ds_status)
        with zero.GatheredParameters([param]):
            return param.data.detach().cpu().clone()
    return param.detach().cpu().clone()


# The model whose adapter file LLaVA is writing, inside `saving_adapter_of` (one per thread / task).
_MODEL_BEING_SAVED: contextvars.ContextVar[nn.Module | None] = contextvars.ContextVar("hive_llava_saving", default=None)


@contextlib.contextmanager
def saving_adapter_of(model: nn.Module) -> Iterator[None]:
    """Inside, LLaVA writes `model`'s adapter file: `apply_patch` opens this around LLaVA's two adapter saves
    (`safe_save_model_for_hf_trainer`, `LLaVATrainer._save_checkpoint`), whose `get_mm_adapter_state_maybe_zero_3`
    is handed the parameters alone, so that `adapter_state` knows which model's settings go with them. (The patch
    file passes the model to `add_projector_settings` at those two places instead.)"""
    token = _MODEL_BEING_SAVED.set(model)
    try:
        yield
    finally:
        _MODEL_BEING_SAVED.reset(token)


def adapter_state(get_adapter_state):
    """Wrap LLaVA's `get_mm_adapter_state_maybe_zero_3` (what `mm_projector.bin` is made of) so that a HIVE
    projector's settings are saved with its weights: those of the model `saving_adapter_of` names."""

    def get_mm_adapter_state_maybe_zero_3(named_params, keys_to_match):
        state = get_adapter_state(named_params, keys_to_match)
        model = _MODEL_BEING_SAVED.get()
        if model is not None:
            return add_projector_settings(state, model)
        if any("mm_projector.hive_" in key for key in state):
            warnings.warn(
                "LLaVA's get_mm_adapter_state_maybe_zero_3 called outside its adapter saves: the HIVE weights are "
                "collected without their settings (add them with add_projector_settings(state, model))",
                stacklevel=2,
            )
        return state

    return get_mm_adapter_state_maybe_zero_3
