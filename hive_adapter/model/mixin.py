"""`HiveMixin`: what a HIVE model does, whether it wraps a base model or is a full model.

`HiveModel` (`adapter_model.py`, a PEFT-style wrapper around e.g. a llava-hf model) and
`HiveForConditionalGeneration` (`modeling_hive.py`, a vision encoder + a causal LM composed into one
`PreTrainedModel`) both inherit it. It builds HIVE's modules (`builders.py`), hooks the blocks into the decoder
layers (`attach.py`), and runs a forward as four steps (docs/ARCHITECTURE.md, "The forward path"):

    1. new prompt or decoding step?  runtime.prompt_for_call    (runtime.py)
    2. the prompt's vision context   hive_prompt_context: markers (layout.py) + tower and levels (vision.py)
    3. the language model            inside `with runtime.forward_scope(prompt)`: its hooked layers read the
                                     context (attach.py); released when the scope exits, however it exits
    4. end of the decoder stack      runtime.end_stack: a returned cache carries the prompt to decoding steps

The data flow of a forward and of `generate` is the connector's (`connectors.py`): cross-attention read by the
hooked layers (`hive`, `cascaded`), or the deepest level spliced into the input embeddings (`concat`).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from torch import nn

from .architectures import TextShape, VisionShape, find_decoder_layers, text_shape_of
from .attach import HiveAttachment, attach_hive_hooks, find_layer_owner
from .builders import block_factory, build_level_encoder, cross_attention_kernel
from .config import HiveConfig
from .connectors import Connector, connector_for
from .context import HiveVisionContext
from .cross_attention import HiveCrossAttention
from .layer_choice import ResolvedLayers
from .layout import find_markers, marker_slots, one_image_per_sample
from .levels import HiveLevelEncoder
from .packing import PackedLayout, refuse_packed_generation
from .parameters import is_hive_parameter
from .readers import reader_for
from .runtime import HiveRuntime
from .vision import HiveVisionSide, build_vision_context

logger = logging.getLogger(__name__)


def hold_reference(owner: nn.Module, name: str, module: nn.Module) -> None:
    """`owner.<name> = module` without registering `module` as a child of `owner`.

    `nn.Module.__setattr__` registers every module assigned to an attribute. A module that already has its place
    (the base model's vision tower, the model a `HiveBackbone` views) would get a second name: a second copy of its
    keys in state dicts, a second entry in `named_modules()`, a second target for PEFT. The reference is a plain
    instance attribute instead, which `state_dict()` and `named_modules()` never read and `copy.deepcopy` copies
    to the same copy of the module."""
    object.__setattr__(owner, name, module)


def module_path(root: nn.Module, module: nn.Module) -> str:
    """The dotted name of `module` inside `root` (a ValueError when `root` does not hold it)."""
    for name, candidate in root.named_modules(remove_duplicate=False):
        if candidate is module:
            return name
    raise ValueError(f"{type(module).__name__} is not a module of this {type(root).__name__}; register it first")


class HiveMixin:
    """HIVE's modules and forward logic; the class that mixes it in decides where the base parts live."""

    hive_config: HiveConfig
    hive_layers: ResolvedLayers
    hive_levels: HiveLevelEncoder
    hive_blocks: nn.ModuleDict  # decoder layer index (as a string) -> its gated cross-attention block
    hive_runtime: HiveRuntime

    # ------------------------------------------------------------------ construction
    def _init_hive(
        self,
        *,
        config: HiveConfig,
        vision_tower: nn.Module,
        vision_config,
        language_root: nn.Module,
        text_config,
        image_token_id: int | None,
        family_config=None,
    ) -> None:
        """`family_config`: the wrapped VLM's own config, which some readers need (LLaVA-NeXT's grid pinpoints)."""
        layers_path, layers = find_decoder_layers(language_root, config.layers_path)
        text = text_shape_of(text_config, len(layers))
        vision = reader_for(vision_tower, family_config).shape_of(vision_config)
        self._hive_family_config = family_config
        resolved = config.resolve_layers(num_vision_layers=vision.num_layers, num_llm_layers=text.num_layers)

        vocab_size = getattr(text_config, "vocab_size", None)
        if image_token_id is not None and vocab_size is not None and not 0 <= image_token_id < vocab_size:
            raise ValueError(
                f"image_token_id={image_token_id} is outside the language model's vocabulary of {vocab_size} tokens; "
                "add the marker to the tokenizer and resize the embeddings (model.resize_token_embeddings) first"
            )

        self.hive_config = config
        self.hive_layers = resolved
        self.hive_runtime = HiveRuntime()
        # The tower stays where the base keeps it; HIVE remembers *where*, not the object, so a tower replaced
        # later (PEFT's modules_to_save, a swapped encoder) is the one it runs.
        self._hive_vision_tower_path = module_path(self, vision_tower)
        self._hive_vision_shape = vision
        self._hive_text_shape = text
        self._hive_image_token_id = image_token_id
        self.hive_levels = build_level_encoder(config, resolved, vision, text)
        self._hive_text_config = text_config  # its attention implementation, read again by set_attn_implementation
        kernel = cross_attention_kernel(config, text_config)
        make_block = block_factory(config, vision, text, kernel)
        # Named by the decoder layer each block runs in (`hive_blocks.3.*`), beside the language model, whose
        # parameter names stay its own.
        self.hive_blocks = nn.ModuleDict({str(index): make_block() for index in resolved.llm_layers})
        attachment = attach_hive_hooks(
            model=language_root,
            layers=layers,
            layers_path=layers_path,
            llm_layers=resolved.llm_layers,
            level_of_block=resolved.level_of_block,
            blocks=self.hive_blocks,
            placement=config.placement,
            runtime=self.hive_runtime,
        )
        self._hive_attachment = attachment
        logger.info(
            "HIVE (%s): vision layers %s -> decoder layers %s, %s cross-attention",
            config.connector,
            list(resolved.vision_layers),
            list(resolved.llm_layers),
            kernel,
        )

    def set_attn_implementation(self, attn_implementation, *args: Any, **kwargs: Any) -> None:
        """transformers' `set_attn_implementation`, reaching HIVE's cross-attention too (unless
        `HiveConfig.cross_attn_implementation` fixes it)."""
        parent = getattr(super(), "set_attn_implementation", None)
        if parent is None:  # HiveModel: the wrapped base model holds the language model's config
            parent = self.base_model.set_attn_implementation
        parent(attn_implementation, *args, **kwargs)
        self.hive_follow_attn_implementation()

    def hive_follow_attn_implementation(self) -> str:
        """Set every block's kernel from the config and the language model's current attention implementation."""
        kernel = cross_attention_kernel(self.hive_config, self._hive_text_config)
        for module in self.hive_blocks.modules():
            if isinstance(module, HiveCrossAttention):
                module.implementation = kernel
        return kernel

    @property
    def hive_decoder_stack(self) -> tuple[nn.Module, nn.ModuleList]:
        """(the module that runs the decoder layers, e.g. `LlamaModel`; the layers), where the connectors that
        add to a layer's output hook in (`deepstack`)."""
        layers = self._hive_attachment.layers
        return find_layer_owner(self, layers), layers

    @property
    def hive_image_token_id(self) -> int | None:
        return self._hive_image_token_id

    @property
    def hive_vision_shape(self) -> VisionShape:
        return self._hive_vision_shape

    @property
    def hive_text_shape(self) -> TextShape:
        return self._hive_text_shape

    @property
    def hive_vision(self) -> HiveVisionSide:
        """The vision tower, its shape, the levels HIVE reads and their projectors (built on each access, so it
        follows a module that was replaced, e.g. by PEFT)."""
        return HiveVisionSide(
            tower=self.get_submodule(self._hive_vision_tower_path),
            shape=self._hive_vision_shape,
            vision_layers=self.hive_layers.vision_layers,
            levels=self.hive_levels,
            family_config=getattr(self, "_hive_family_config", None),
        )

    def hive_top_modules(self) -> list[nn.Module]:
        """The modules HIVE added: the level encoder and one block per chosen decoder layer."""
        return [self.hive_levels, *self.hive_blocks.values()]

    def hive_modules_to_save(self) -> list[str]:
        """The names of HIVE's modules for PEFT's `modules_to_save` (`LoraConfig(modules_to_save=...)`, also
        through TRL's `SFTTrainer(peft_config=...)`): the level encoder and each block, one by one (PEFT wraps
        modules, not a `ModuleDict`). HIVE's modules are new in a model being fine-tuned, its gates at 0: left to
        LoRA they stay frozen and the images never reach the text. Listed here, they train whole and are saved
        in the adapter."""
        return ["hive_levels", *(f"hive_blocks.{index}" for index in self.hive_blocks)]

    def hive_place_modules(self, *, device: torch.device, dtype: torch.dtype) -> None:
        """Put HIVE's modules on the base's device and dtype; gates and norms stay float32 for stability."""
        for module in self.hive_top_modules():
            module.to(device=device, dtype=dtype if dtype.is_floating_point else None)  # KeepsFloat32 stays fp32

    def _remove_hive(self) -> HiveAttachment:
        attachment: HiveAttachment = self._hive_attachment
        attachment.remove()
        self.hive_runtime.clear()
        return attachment

    # ------------------------------------------------------------------ the vision context of a prompt
    def hive_encode_images(
        self, pixel_values: torch.Tensor, **vision_inputs: Any
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Projected levels of `pixel_values`, each (images, n, media width), and the (images, n) mask of real
        tokens (None when every token is real)."""
        return self.hive_vision.encode(pixel_values, **vision_inputs)

    def hive_markers(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor | None:
        """(batch, text) True where an image marker stands; None without a marker token (captioning)."""
        return find_markers(
            self.hive_image_token_id,
            input_ids,
            inputs_embeds,
            embedding_table=lambda: self.get_input_embeddings().weight,
        )

    def hive_prompt_context(
        self,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        pixel_values: torch.Tensor | None,
        segments: torch.Tensor | None = None,
        **vision_inputs: Any,
    ) -> HiveVisionContext:
        """The vision context of a new prompt, given as token ids, embeddings, or both (markers from the ids).
        `segments` (batch, text): the sample of each token in packed rows (`hive_adapter.model.packing`), or None.
        Changes no state: the runtime makes it current inside a scope (`forward_scope`, `pinned_to`)."""
        reference = input_ids if input_ids is not None else inputs_embeds
        if reference is None:
            raise ValueError("pass input_ids or inputs_embeds")
        if reference.shape[1] == 0:
            raise ValueError(f"an empty prompt (input of shape {tuple(reference.shape[:2])}): give at least one token")
        batch, length = reference.shape[:2]
        markers = self.hive_markers(input_ids, inputs_embeds)
        packed = None
        if segments is not None:
            # Packed rows: the context is laid out per sample, exactly as for padded rows (`PackedLayout`).
            packed = PackedLayout.from_segments(segments)
            batch, length = packed.samples, packed.width
            if markers is not None:
                markers = packed.gather(markers) & packed.valid

        slots = None
        vision = self.hive_vision
        if pixel_values is not None:  # which sample sees which image, from which column
            images = vision.num_images(pixel_values, vision_inputs)
            if markers is None:
                slots = one_image_per_sample(batch, images, reference.device)
            else:
                slots = marker_slots(markers, images, image_token_id=self.hive_image_token_id)
        context = build_vision_context(
            vision,
            pixel_values,
            vision_inputs,
            slots=slots,
            batch_size=batch,
            prompt_length=length,
            device=reference.device,
            media_attention=self.hive_config.media_attention,
            training=self.training,
        )
        return context if packed is None else dataclasses.replace(context, packed=packed)

    # ------------------------------------------------------------------ forward and generate
    def hive_pop_vision_inputs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Take the vision tower's inputs beside pixel_values out of `kwargs` (they go to the tower through its
        reader, never to the language model)."""
        return {name: kwargs.pop(name) for name in self.hive_vision.input_names if name in kwargs}

    @property
    def hive_connector(self) -> Connector:
        """How the images reach the language model (`hive_adapter.model.connectors`)."""
        return connector_for(self.hive_config.connector)

    def _hive_forward(
        self,
        language_model: nn.Module,
        *,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values: Any = None,
        **kwargs: Any,
    ):
        """One forward of the language model with the images seen through the connector.

        With `inputs_embeds`, `input_ids` may come alongside: the markers are read from the ids and only the
        embeddings reach the language model.
        """
        vision_inputs = self.hive_pop_vision_inputs(kwargs)
        return self.hive_connector.forward(
            self,
            language_model,
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            labels=labels,
            inputs_embeds=inputs_embeds,
            past_key_values=past_key_values,
            vision_inputs=vision_inputs,
            **kwargs,
        )

    def _hive_hidden_states(self, decoder: nn.Module, **inputs: Any):
        """`_hive_forward` without the LM head: the decoder stack's output, one hidden state per input column
        (`Connector.hidden_states`). What `HiveForConditionalGeneration.base_model` runs."""
        if inputs.pop("labels", None) is not None:
            raise ValueError("the backbone has no LM head and takes no labels; call the model itself for a loss")
        vision_inputs = self.hive_pop_vision_inputs(inputs)
        for name in ("input_ids", "pixel_values", "attention_mask", "inputs_embeds", "past_key_values"):
            inputs.setdefault(name, None)
        return self.hive_connector.hidden_states(self, decoder, vision_inputs=vision_inputs, **inputs)

    def _hive_generate(
        self,
        generate,
        *,
        input_ids: torch.Tensor | None,
        pixel_values: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ):
        """Generation for every connector, returning what `generate` returns for a decoder-only LM: prompt +
        new tokens when `input_ids` are given (with or without `inputs_embeds`), the new tokens alone from
        `inputs_embeds` alone. Cross-attention connectors build the prompt's vision context once (vision tower
        and every block's K/V run once per prompt) and pin it while `generate` runs on text alone."""
        vision_inputs = self.hive_pop_vision_inputs(kwargs)
        refuse_packed_generation(kwargs.get("position_ids"), attention_mask)
        return self.hive_connector.generate(
            self,
            generate,
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            vision_inputs=vision_inputs,
            **kwargs,
        )

    # ------------------------------------------------------------------ parameters
    def hive_named_parameters(self):
        """Every parameter HIVE added, by its name in this model (all carry the `hive_` prefix)."""
        for name, param in self.named_parameters():
            if is_hive_parameter(name):
                yield name, param

    def hive_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: param.detach() for name, param in self.hive_named_parameters()}
