"""`apply_patch()`: add `--vision_connector hive` to the installed LLaVA repo (package `llava`).

For users who run LLaVA from pip (`llava-torch`) rather than from a checkout they can edit. It wraps
the same functions `patches/llava/*.patch` edits, and both call `handlers`, so the two routes behave
identically. Idempotent; LLaVA's behaviour is unchanged for every connector but HIVE's.

It also keeps LLaVA's code running where its pins show their age:
- saving with `--tune_mm_mlp_adapter` imports DeepSpeed even without ZeRO-3 (`maybe_zero_3`), and
  the final DeepSpeed save calls `torch.cuda.synchronize()` (CPU runs);
- transformers 5.x moved `ALL_LAYERNORM_LAYERS`, renamed `Trainer(tokenizer=)` to
  `processing_class=` and hands `_get_train_sampler` the dataset.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import logging

import torch

from . import handlers

logger = logging.getLogger(__name__)

_PATCHED_MARK = "_hive_patched"


def _wrap(owner, name: str, make):
    """Replace `owner.name` by `make(original)` once."""
    original = getattr(owner, name)
    if getattr(original, _PATCHED_MARK, False):
        return
    replacement = make(original)
    functools.update_wrapper(replacement, original)
    setattr(replacement, _PATCHED_MARK, True)
    setattr(owner, name, replacement)


def _import(name: str):
    """Import a LLaVA module directly: `llava.model`'s own `__init__` swallows import errors, which
    turns e.g. a missing Pillow into "cannot import name LlavaLlamaForCausalLM"."""
    return importlib.import_module(name)


def install_transformers_shims() -> None:
    """Names LLaVA 1.2.2 imports from transformers 4.37 that later versions moved."""
    import transformers.trainer as trainer_module

    if not hasattr(trainer_module, "ALL_LAYERNORM_LAYERS"):
        trainer_module.ALL_LAYERNORM_LAYERS = [torch.nn.LayerNorm]


def _patch_model() -> None:
    from ...data.collator import IGNORE_INDEX
    from .markers import IMAGE_TOKEN_INDEX

    constants = _import("llava.constants")
    if (constants.IMAGE_TOKEN_INDEX, constants.IGNORE_INDEX) != (IMAGE_TOKEN_INDEX, IGNORE_INDEX):
        raise RuntimeError(
            f"this LLaVA marks images with {constants.IMAGE_TOKEN_INDEX} and ignores labels {constants.IGNORE_INDEX}; "
            f"hive-adapter was written for {IMAGE_TOKEN_INDEX} / {IGNORE_INDEX} (llava-torch 1.2.2)"
        )
    projector_builder = _import("llava.model.multimodal_projector.builder")
    arch = _import("llava.model.llava_arch")
    llava_llama = _import("llava.model.language_model.llava_llama")

    def make_build(original):
        def build_vision_projector(config, delay_load=False, **kwargs):
            projector = handlers.build_projector(config)
            return projector if projector is not None else original(config, delay_load=delay_load, **kwargs)

        return build_vision_projector

    _wrap(projector_builder, "build_vision_projector", make_build)
    arch.build_vision_projector = projector_builder.build_vision_projector  # llava_arch imported the name

    def make_init(original):
        def __init__(self, config):
            original(self, config)
            handlers.attach(self)

        return __init__

    _wrap(arch.LlavaMetaModel, "__init__", make_init)

    def make_initialize(original):
        def initialize_vision_modules(self, model_args, fsdp=None):
            handlers.configure(self, model_args)
            if isinstance(fsdp, bool):  # transformers 5 turns `--fsdp ...` into True; LLaVA takes len(fsdp)
                fsdp = ["full_shard"] if fsdp else []
            original(self, model_args, fsdp=fsdp)
            handlers.attach(self)

        return initialize_vision_modules

    _wrap(arch.LlavaMetaModel, "initialize_vision_modules", make_initialize)

    def make_prepare(original):
        def prepare_inputs_labels_for_multimodal(self, *args, **kwargs):
            prepared = handlers.prepare_inputs(self, *args, **kwargs)
            return prepared if prepared is not None else original(self, *args, **kwargs)

        return prepare_inputs_labels_for_multimodal

    _wrap(arch.LlavaMetaForCausalLM, "prepare_inputs_labels_for_multimodal", make_prepare)

    def make_generate(original):
        def generate(self, inputs=None, images=None, image_sizes=None, **kwargs):
            if handlers.hive_modules_of(self) is None:
                return original(self, inputs, images=images, image_sizes=image_sizes, **kwargs)
            return handlers.generate(self, inputs, images=images, image_sizes=image_sizes, **kwargs)

        return generate

    _wrap(llava_llama.LlavaLlamaForCausalLM, "generate", make_generate)
    _wrap_from_pretrained(llava_llama.LlavaLlamaForCausalLM)
    # transformers 4.37 loads these in float32 under torch_dtype=float16 (LLaVA's builder loads fp16) instead of
    # rounding them through fp16; under bfloat16 it rounds every tensor, and HIVE's are put back in float32 after.
    if llava_llama.LlavaLlamaForCausalLM._keep_in_fp32_modules is None:
        llava_llama.LlavaLlamaForCausalLM._keep_in_fp32_modules = list(handlers.FLOAT32_MODULES)


def _wrap_from_pretrained(model_class) -> None:
    """`model_class.from_pretrained` (a classmethod) followed by `handlers.loaded`."""
    original = model_class.from_pretrained
    if getattr(original, _PATCHED_MARK, False):
        return

    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        result = original.__func__(cls, pretrained_model_name_or_path, *args, **kwargs)
        model = result[0] if isinstance(result, tuple) else result  # output_loading_info=True
        handlers.loaded(model, pretrained_model_name_or_path, **kwargs)
        return result

    functools.update_wrapper(from_pretrained, original.__func__)
    setattr(from_pretrained, _PATCHED_MARK, True)
    model_class.from_pretrained = classmethod(from_pretrained)


def _patch_training() -> None:
    install_transformers_shims()
    llava_trainer = _import("llava.train.llava_trainer")
    train_module = _import("llava.train.train")
    if getattr(train_module, _PATCHED_MARK, False):
        return

    for module in (train_module, llava_trainer):
        module.maybe_zero_3 = handlers.maybe_zero_3
        _wrap(module, "get_mm_adapter_state_maybe_zero_3", handlers.adapter_state)
    _wrap(train_module, "safe_save_model_for_hf_trainer", _save_without_cuda)

    # LLaVA's argument dataclasses gain the HIVE flags; train() looks them up in its module at call time.
    # They take the place (module and name) of the classes they extend, so pickling them (the Trainer
    # saves its arguments with torch.save) finds them.
    for name, extra in (
        ("ModelArguments", handlers.LlavaHiveArguments),
        ("TrainingArguments", handlers.LlavaHiveTrainingArguments),
    ):
        extended = type(name, (extra, getattr(train_module, name)), {"__module__": train_module.__name__})
        setattr(train_module, name, dataclasses.dataclass(extended))
    train_module.LLaVATrainer = _hive_trainer_class(llava_trainer.LLaVATrainer)
    setattr(train_module, _PATCHED_MARK, True)


def _save_without_cuda(original):
    """LLaVA's final save calls `torch.cuda.synchronize()` before a DeepSpeed save; skip it without CUDA. An adapter
    save knows the model it saves (`handlers.saving_adapter_of`)."""

    def safe_save_model_for_hf_trainer(trainer, output_dir):
        tune_adapter = getattr(trainer.args, "tune_mm_mlp_adapter", False)
        if trainer.deepspeed and not tune_adapter and not torch.cuda.is_available():
            trainer.save_model(output_dir)
            return
        with handlers.saving_adapter_of(trainer.model):
            original(trainer=trainer, output_dir=output_dir)

    return safe_save_model_for_hf_trainer


def _hive_trainer_class(base):
    import inspect

    from transformers import Trainer

    takes_processing_class = "processing_class" in inspect.signature(Trainer.__init__).parameters
    sampler_takes_dataset = len(inspect.signature(Trainer._get_train_sampler).parameters) > 1

    class LLaVATrainer(base):
        """LLaVA's trainer, run after `handlers.prepare_for_training` and across transformers versions."""

        def __init__(self, *args, **kwargs):
            handlers.prepare_for_training(kwargs.get("model"), kwargs.get("args"))
            if takes_processing_class and "tokenizer" in kwargs:
                kwargs["processing_class"] = kwargs.pop("tokenizer")
            super().__init__(*args, **kwargs)

        def _save_checkpoint(self, *args, **kwargs):
            with handlers.saving_adapter_of(self.model):  # LLaVA saves mm_projector.bin here with --tune_mm_mlp_adapter
                return super()._save_checkpoint(*args, **kwargs)

        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            from ...training.trainer import enable_fsdp_on_cpu_ranks

            enable_fsdp_on_cpu_ranks(self)

        if sampler_takes_dataset:

            def _get_train_sampler(self, train_dataset=None):
                if train_dataset is not None and train_dataset is not self.train_dataset:
                    return Trainer._get_train_sampler(self, train_dataset)
                return base._get_train_sampler(self)

    LLaVATrainer.__qualname__ = base.__qualname__
    return LLaVATrainer


def apply_patch() -> None:
    """Teach the installed `llava` package the HIVE connector (model, generation and training)."""
    _patch_model()
    _patch_training()
    logger.info("LLaVA patched: --vision_connector hive available")
