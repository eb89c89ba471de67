"""`HiveMixin`: what a HIVE model does, whether it wraps a base model or is a full model.

`HiveModel` (PEFT-style wrapper around e.g. a llava-hf model) and `HiveForConditionalGeneration` (a
vision encoder + a causal LM composed into one `PreTrainedModel`) both inherit it. It builds the new
modules (one projector per level, one gated block per chosen decoder depth), runs the vision encoder,
lays the projected levels out per sample with their markers (`HiveVisionContext`) and hands the
batch to the language model, which never sees an image token (DESIGN §3). The `concat` connector is
the self-attention baseline through the same class: the deepest selected level is spliced into the
input embeddings at the marker, as LLaVA does.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .architectures import (
    TextShape,
    VisionShape,
    find_decoder_layers,
    text_shape_of,
    vision_shape_of,
)
from .config import HiveConfig, ResolvedLayers
from .context import HiveRuntime, HiveVisionContext, past_length_of
from .cross_attention import HiveCrossAttentionBlock, HiveLayerNorm
from .inject import HiveAttachment, attach_hive_hooks
from .levels import HiveLevelEncoder

logger = logging.getLogger(__name__)

HIVE_PREFIX = "hive_"
# Extra vision inputs some encoders take next to pixel_values (SigLIP2 NaFlex); routed to the tower.
VISION_INPUT_NAMES = ("pixel_attention_mask", "spatial_shapes")
IGNORE_INDEX = -100


def cross_attention_kernel(config: HiveConfig, text_config) -> str:
    """HIVE's own setting, else the language model's attention implementation, else SDPA."""
    if config.cross_attn_implementation is not None:
        return config.cross_attn_implementation
    implementation = getattr(text_config, "_attn_implementation", None)
    return implementation if implementation in ("eager", "flash_attention_2") else "sdpa"


def kv_shape(config: HiveConfig, text: TextShape) -> tuple[int, int, int]:
    """(query heads, K/V heads, head width) of the cross-attention; defaults follow the language model (its
    query heads, its grouped K/V heads, its head width)."""
    heads = config.num_attention_heads or text.num_heads
    kv_heads = config.num_key_value_heads or (text.num_kv_heads if config.num_attention_heads is None else heads)
    if heads % kv_heads:
        raise ValueError(
            f"num_key_value_heads={kv_heads}: must divide num_attention_heads={heads} (grouped-query attention)"
        )
    head_dim = config.head_dim or (text.head_dim if config.num_attention_heads is None else text.hidden_size // heads)
    return heads, kv_heads, head_dim


def media_width(config: HiveConfig, vision: VisionShape, text: TextShape) -> int:
    """Width of the projected levels: the LLM width, or for the lean projector `media_width`, by default no
    wider than what either side carries: the vision width, and the K/V width the levels are projected to
    (keys and values together: twice the grouped K/V width)."""
    if config.projector_type != "lean":
        return text.hidden_size
    _, kv_heads, head_dim = kv_shape(config, text)
    return config.media_width or min(vision.hidden_size, 2 * kv_heads * head_dim)


def build_level_encoder(
    config: HiveConfig, resolved: ResolvedLayers, vision: VisionShape, text: TextShape
) -> HiveLevelEncoder:
    """One projector per selected vision level (plus level embeddings when every block sees every level)."""
    return HiveLevelEncoder(
        num_levels=len(resolved.vision_layers),
        projector_type=config.projector_type,
        vision_hidden_size=vision.hidden_size,
        output_size=media_width(config, vision, text),
        tokens_per_level=config.tokens_per_level,
        keep_prefix_tokens=config.vision_feature_select == "full",
        level_embedding=config.connector == "hive" and config.level_mapping == "all",
    )


def block_factory(
    config: HiveConfig, vision: VisionShape, text: TextShape, kernel: str
) -> Callable[[], HiveCrossAttentionBlock]:
    """A constructor for the gated cross-attention blocks, with head counts resolved against the LM."""
    heads, kv_heads, head_dim = kv_shape(config, text)
    media = media_width(config, vision, text)

    def make_block() -> HiveCrossAttentionBlock:
        return HiveCrossAttentionBlock(
            hidden_size=text.hidden_size,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            media_size=media,
            use_ffn=config.use_ffn,
            ffn_mult=config.ffn_mult,
            gate_init=config.gate_init,
            norm_eps=text.norm_eps,
            implementation=kernel,
        )

    return make_block


def _initialise(tensor: torch.Tensor, fill: Callable[[torch.Tensor], Any]) -> None:
    """`fill(tensor)` unless transformers marked the tensor as loaded from a checkpoint (5.x `from_pretrained`)."""
    if not getattr(tensor, "_is_hf_initialized", False):
        fill(tensor)


@torch.no_grad()
def init_hive_module(module: nn.Module, config: HiveConfig) -> None:
    """Initialise the tensors a HIVE module holds itself (not its children's): linear weights and level
    embeddings ~ N(0, `initializer_range`), zero biases, unit norms, gates at `gate_init` (0: the base's
    computation). Tensors that `from_pretrained` already loaded are left alone, so a checkpoint missing
    some HIVE keys gets exactly those initialised.

    Per module, as transformers' `_init_weights` is called: it skips modules without tensors of their own.
    """
    std = config.initializer_range
    if isinstance(module, nn.Linear):
        _initialise(module.weight, lambda t: t.normal_(mean=0.0, std=std))
        if module.bias is not None:
            _initialise(module.bias, torch.Tensor.zero_)
    elif isinstance(module, HiveLayerNorm):
        _initialise(module.weight, lambda t: t.fill_(1.0))
        _initialise(module.bias, torch.Tensor.zero_)
    elif isinstance(module, HiveCrossAttentionBlock):
        for gate in (module.hive_attn_gate, getattr(module, "hive_ffn_gate", None)):
            if gate is not None:
                _initialise(gate, lambda t: t.fill_(config.gate_init))
    elif isinstance(module, HiveLevelEncoder) and module.level_embedding is not None:
        _initialise(module.level_embedding, lambda t: t.normal_(mean=0.0, std=std))


def init_hive_weights(module: nn.Module, config: HiveConfig) -> None:
    """`init_hive_module` on a HIVE module and everything inside it."""
    for sub in module.modules():
        init_hive_module(sub, config)


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
    ) -> None:
        layers_path, layers = find_decoder_layers(language_root, config.layers_path)
        text = text_shape_of(text_config, len(layers))
        vision = vision_shape_of(vision_config)
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
        object.__setattr__(self, "_hive_vision_tower", vision_tower)  # a reference, not a second registration
        object.__setattr__(self, "_hive_vision_shape", vision)
        object.__setattr__(self, "_hive_text_shape", text)
        object.__setattr__(self, "_hive_image_token_id", image_token_id)
        self.hive_levels = build_level_encoder(config, resolved, vision, text)
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
            blocks=list(self.hive_blocks.values()),
            placement=config.placement,
            runtime=self.hive_runtime,
        )
        object.__setattr__(self, "_hive_attachment", attachment)
        logger.info(
            "HIVE (%s): vision layers %s -> decoder layers %s, %s cross-attention",
            config.connector,
            list(resolved.vision_layers),
            list(resolved.llm_layers),
            kernel,
        )

    @property
    def hive_image_token_id(self) -> int | None:
        return self._hive_image_token_id

    @property
    def hive_vision_shape(self) -> VisionShape:
        return self._hive_vision_shape

    @property
    def hive_text_shape(self) -> TextShape:
        return self._hive_text_shape

    def hive_top_modules(self) -> list[nn.Module]:
        """The modules HIVE added: the level encoder and one block per chosen decoder layer."""
        return [self.hive_levels, *self.hive_blocks.values()]

    def hive_place_modules(self, *, device: torch.device, dtype: torch.dtype) -> None:
        """Put HIVE's modules on the base's device and dtype; gates and norms stay float32 for stability."""
        for module in self.hive_top_modules():
            module.to(device=device, dtype=dtype if dtype.is_floating_point else None)
            for sub in module.modules():
                if isinstance(sub, HiveLayerNorm):
                    sub.float()
                elif isinstance(sub, HiveCrossAttentionBlock):
                    for gate in (sub.hive_attn_gate, getattr(sub, "hive_ffn_gate", None)):
                        if gate is not None:
                            gate.data = gate.data.float()

    def _remove_hive(self) -> HiveAttachment:
        attachment: HiveAttachment = self._hive_attachment
        attachment.remove()
        self.hive_runtime.clear()
        return attachment

    # ------------------------------------------------------------------ vision side
    def hive_encode_images(
        self, pixel_values: torch.Tensor, **vision_inputs: Any
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Run the vision tower once; return the projected levels, each (images, n, text_width), and the
        (images, n) mask of real tokens (None when every token is real)."""
        tower = self._hive_vision_tower
        self._check_pixel_values(pixel_values, vision_inputs)
        dtype = next(tower.parameters()).dtype
        outputs = tower(pixel_values=pixel_values.to(dtype), output_hidden_states=True, **vision_inputs)
        hidden_states = outputs.hidden_states  # embeddings, then the output of every encoder layer
        states = [hidden_states[index + 1] for index in self.hive_layers.vision_layers]
        spatial_shapes = vision_inputs.get("spatial_shapes")
        if spatial_shapes is not None:
            grids = [tuple(shape) for shape in spatial_shapes.tolist()]
            patch_mask = vision_inputs.get("pixel_attention_mask")
            if patch_mask is None:
                patch_mask = torch.ones(states[0].shape[:2], dtype=torch.bool, device=states[0].device)
        else:
            patch = self.hive_vision_shape.patch_size
            grids = [(pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch)]
            patch_mask = None
        return self.hive_levels(states, grids=grids, patch_mask=patch_mask)

    def _check_pixel_values(self, pixel_values: torch.Tensor, vision_inputs: dict[str, Any]) -> None:
        """Refuse pixels the encoder would crop or mis-read, naming the shape (never a silent wrong answer)."""
        shape = self.hive_vision_shape
        channels = getattr(self._hive_vision_tower.config, "num_channels", 3)
        if "spatial_shapes" in vision_inputs:  # patchified input: (images, patches, channels*patch*patch)
            if pixel_values.ndim != 3 or pixel_values.shape[-1] != channels * shape.patch_size**2:
                raise ValueError(
                    f"pixel_values of shape {tuple(pixel_values.shape)}: this encoder takes patchified pixels of shape "
                    f"(images, patches, {channels * shape.patch_size**2})"
                )
            return
        if pixel_values.ndim != 4 or pixel_values.shape[1] != channels:
            raise ValueError(
                f"pixel_values of shape {tuple(pixel_values.shape)}: expected (images, {channels}, height, width); "
                "stack the images of a batch along the first dimension"
            )
        height, width = pixel_values.shape[-2:]
        native = height == width == shape.image_size  # e.g. SigLIP-so400m/14@384: 27x27 patches by design
        if not native and (height % shape.patch_size or width % shape.patch_size):
            raise ValueError(
                f"pixel_values of size {height}x{width}: not a multiple of the encoder's patch size "
                f"{shape.patch_size} (the encoder expects {shape.image_size}x{shape.image_size}); resize the images"
            )

    def hive_usable_images(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(pixel_values, usable): images holding NaN or inf stop a training step with an error (their gradients
        would be NaN everywhere); otherwise they are zeroed and `usable` (images,) marks them, so that the text
        after their markers sees no image and nothing else in the batch changes. `usable` is None when all are."""
        if pixel_values.device.type == "meta" or not pixel_values.is_floating_point():
            return pixel_values, None
        usable = torch.isfinite(pixel_values.flatten(1)).all(dim=1)  # (images,)
        if bool(usable.all()):
            return pixel_values, None
        bad = (~usable).nonzero().flatten().tolist()
        message = (
            f"pixel_values of image(s) {bad} (of {len(usable)} in the batch) hold NaN or inf; check those images and "
            "the image processor (a std of 0 divides by zero)"
        )
        if self.training and torch.is_grad_enabled():
            raise ValueError(f"{message}. Training stops here: one such image makes every gradient NaN.")
        logger.warning("%s; they are left out: the text after their markers sees no image", message)
        keep = usable.view(-1, *([1] * (pixel_values.ndim - 1)))
        return torch.where(keep, pixel_values, pixel_values.new_zeros(())), usable

    def hive_dummy_vision_inputs(self, device: torch.device) -> dict[str, torch.Tensor]:
        """One blank image in the tower's input format, for batches without images.

        Every HIVE module must run on every rank, even when a rank's batch has no image, or ZeRO-3 and
        FSDP wait forever for the skipped parameters (DESIGN §6.1). The dummy is masked out entirely.
        """
        tower = self._hive_vision_tower
        shape = self.hive_vision_shape
        channels = getattr(tower.config, "num_channels", 3)
        if "spatial_shapes" in inspect.signature(tower.forward).parameters:  # NaFlex-style encoders
            side = max(1, math.isqrt(getattr(tower.config, "num_patches", 16)))
            return {
                "pixel_values": torch.zeros(1, side * side, channels * shape.patch_size**2, device=device),
                "pixel_attention_mask": torch.ones(1, side * side, dtype=torch.long, device=device),
                "spatial_shapes": torch.tensor([[side, side]], device=device),
            }
        return {"pixel_values": torch.zeros(1, channels, shape.image_size, shape.image_size, device=device)}

    # ------------------------------------------------------------------ context
    def hive_markers(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor | None:
        """(batch, text) True where an image marker stands; None without a marker token (captioning).

        From `input_ids` when given; from `inputs_embeds` alone, a marker is a row equal to the marker
        token's embedding (as llava-hf finds its image tokens).
        """
        marker = self.hive_image_token_id
        if marker is None:
            return None
        if input_ids is not None:
            return input_ids == marker
        if inputs_embeds is None:
            raise ValueError("pass input_ids or inputs_embeds")
        table = self.get_input_embeddings().weight
        if table.numel() == 0:  # partitioned (ZeRO-3): nothing to compare against
            raise ValueError(
                "inputs_embeds alone: the image markers cannot be found while the embedding table is partitioned "
                "(ZeRO-3); pass input_ids alongside inputs_embeds (the markers are read from them)"
            )
        return (inputs_embeds == table[marker].to(inputs_embeds.dtype)).all(dim=-1)

    def hive_build_context(
        self,
        markers: torch.Tensor | None,
        pixel_values: torch.Tensor | None,
        *,
        batch_size: int,
        prompt_length: int,
        device: torch.device,
        **vision_inputs: Any,
    ) -> HiveVisionContext:
        """Encode the images of a batch and lay them out per sample, next to their markers.

        markers: (batch, text) from `hive_markers`, None in captioning mode.
        """
        has_images = pixel_values is not None
        if not has_images:
            dummy = self.hive_dummy_vision_inputs(device)
            pixel_values = dummy.pop("pixel_values")
            vision_inputs = dummy
        pixel_values, usable = self.hive_usable_images(pixel_values)
        levels, token_mask = self.hive_encode_images(pixel_values, **vision_inputs)
        num_images = levels[0].shape[0]

        if not has_images:
            # (batch, 1) slot that nobody may see: exact zeros from every block, gradients still defined.
            image_index = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
            image_valid = torch.zeros(batch_size, 1, dtype=torch.bool, device=device)
            marker_positions = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        elif markers is None:
            if num_images != batch_size:
                raise ValueError(
                    f"pixel_values holds {num_images} images for a batch of {batch_size} samples. Without an image "
                    "marker token (image_token_id=None) HIVE pairs exactly one image with each sample; set "
                    "HiveConfig(image_token_id=...) to place several images per sample."
                )
            image_index = torch.arange(batch_size, device=device)[:, None]
            image_valid = torch.ones(batch_size, 1, dtype=torch.bool, device=device)
            marker_positions = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        else:
            image_index, image_valid, marker_positions = _images_per_sample(
                markers, num_images, image_token_id=self.hive_image_token_id
            )
        if usable is not None:  # a left-out image is a slot nobody sees
            image_valid = image_valid & usable[image_index]

        return HiveVisionContext.from_images(
            levels,
            token_mask,
            image_index=image_index,
            image_valid=image_valid,
            marker_positions=marker_positions,
            prompt_length=prompt_length,
            media_attention=self.hive_config.media_attention,
        )

    def hive_prompt_context(
        self,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        pixel_values: torch.Tensor | None,
        **vision_inputs: Any,
    ) -> HiveVisionContext:
        """The vision context of a new prompt, given as token ids, embeddings, or both (markers from the ids)."""
        reference = input_ids if input_ids is not None else inputs_embeds
        if reference is None:
            raise ValueError("pass input_ids or inputs_embeds")
        if reference.shape[1] == 0:
            raise ValueError(f"an empty prompt (input of shape {tuple(reference.shape[:2])}): give at least one token")
        return self.hive_build_context(
            self.hive_markers(input_ids, inputs_embeds),
            pixel_values,
            batch_size=reference.shape[0],
            prompt_length=reference.shape[1],
            device=reference.device,
            **vision_inputs,
        )

    def hive_prepare_context(
        self,
        input_ids: torch.Tensor | None,
        pixel_values: torch.Tensor | None,
        *,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        **vision_inputs: Any,
    ) -> HiveVisionContext:
        """Decide, for one forward call, whether this is a new prompt (new context) or a decoding step."""
        runtime = self.hive_runtime
        current = runtime.context
        if runtime.pinned:  # inside generate(): the prompt's context was built once, up front
            return current
        if past_length_of(past_key_values) > 0 and pixel_values is None:
            if current is None:
                raise RuntimeError("a decoding step (past_key_values given) arrived before any prompt was seen")
            return current
        context = self.hive_prompt_context(input_ids, inputs_embeds, pixel_values, **vision_inputs)
        runtime.set_context(context)
        return context

    # ------------------------------------------------------------------ forward
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
        """One forward of the language model with the images seen through HIVE (or spliced, `concat`).

        With `inputs_embeds`, `input_ids` may come alongside: the markers are read from the ids and only the
        embeddings reach the language model.
        """
        vision_inputs = {name: kwargs.pop(name) for name in VISION_INPUT_NAMES if name in kwargs}
        if self.hive_config.connector == "concat":
            return self._concat_forward(
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
        self.hive_prepare_context(
            input_ids, pixel_values, past_key_values=past_key_values, inputs_embeds=inputs_embeds, **vision_inputs
        )
        return language_model(
            input_ids=input_ids if inputs_embeds is None else None,
            attention_mask=attention_mask,
            labels=labels,
            inputs_embeds=inputs_embeds,
            past_key_values=past_key_values,
            **kwargs,
        )

    def _concat_forward(
        self,
        language_model,
        *,
        input_ids,
        pixel_values,
        attention_mask,
        labels,
        inputs_embeds,
        past_key_values,
        vision_inputs,
        **kwargs,
    ):
        """The self-attention baseline: image tokens spliced into the sequence (LLaVA's own data flow)."""
        if pixel_values is None and not (self.training and torch.is_grad_enabled()):
            # Text alone: a decoding step, or embeddings `generate` already spliced. (A training step without
            # images still runs every projector below: ZeRO-3 must see each parameter on every rank.)
            return language_model(
                input_ids=input_ids if inputs_embeds is None else None,
                attention_mask=attention_mask,
                labels=labels,
                inputs_embeds=inputs_embeds,
                past_key_values=past_key_values,
                **kwargs,
            )
        if pixel_values is not None and past_length_of(past_key_values) > 0:
            raise ValueError(
                "connector='concat': pixel_values came with a decoding step (the cache already holds "
                f"{past_length_of(past_key_values)} tokens); images are spliced into the prompt, pass them with it"
            )
        embeddings, attention_mask, labels = self._concat_embeddings(
            language_model,
            input_ids,
            inputs_embeds,
            pixel_values,
            attention_mask,
            labels,
            vision_inputs,
            padding_side="right",
        )
        return language_model(
            inputs_embeds=embeddings,
            attention_mask=attention_mask,
            labels=labels,
            past_key_values=past_key_values,
            **kwargs,
        )

    def _concat_embeddings(
        self,
        language_model,
        input_ids,
        inputs_embeds,
        pixel_values,
        attention_mask,
        labels,
        vision_inputs,
        *,
        padding_side: str,
    ):
        """Input embeddings with each image's tokens spliced in at its marker (the concat baseline).

        Without images every projector still runs (ZeRO-3 must see every parameter) and adds exactly zero.
        """
        embeddings = inputs_embeds if inputs_embeds is not None else language_model.get_input_embeddings()(input_ids)
        if pixel_values is None:
            dummy = self.hive_dummy_vision_inputs(embeddings.device)
            levels, _ = self.hive_encode_images(dummy.pop("pixel_values"), **dummy)
            return embeddings + 0.0 * levels[-1].sum().to(embeddings.dtype), attention_mask, labels
        pixel_values, _ = self.hive_usable_images(pixel_values)  # a left-out image is spliced as a blank one
        levels, token_mask = self.hive_encode_images(pixel_values, **vision_inputs)
        if token_mask is not None:
            raise NotImplementedError("connector='concat' does not splice padded (NaFlex) patches; pool them")
        return splice_image_tokens(
            markers=self.hive_markers(input_ids, inputs_embeds),
            embeddings=embeddings,
            images=levels[-1].to(embeddings.dtype),
            attention_mask=attention_mask,
            labels=labels,
            padding_side=padding_side,
        )

    def _hive_generate(
        self,
        generate,
        language_model: nn.Module,
        *,
        input_ids: torch.Tensor | None,
        pixel_values: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ):
        """Generation for every connector, returning what `generate` returns for a decoder-only LM: prompt +
        new tokens when `input_ids` are given (with or without `inputs_embeds`), the new tokens alone from
        `inputs_embeds` alone.

        `hive`/`cascaded`: the vision context is built once here (vision tower and every block's K/V run
        once per prompt) and `generate` runs on text alone. `concat`: the image tokens are spliced into
        left-padded input embeddings and `generate` runs on those.
        """
        vision_inputs = {name: kwargs.pop(name) for name in VISION_INPUT_NAMES if name in kwargs}
        text = {
            name: value
            for name, value in (("input_ids", input_ids), ("inputs_embeds", inputs_embeds))
            if value is not None
        }
        if self.hive_config.connector != "concat":
            self.hive_runtime.clear()
            context = self.hive_prompt_context(input_ids, inputs_embeds, pixel_values, **vision_inputs)
            with self.hive_runtime.generation(context):
                return generate(**text, attention_mask=attention_mask, **kwargs)
        embeddings, attention_mask, _ = self._concat_embeddings(
            language_model,
            input_ids,
            inputs_embeds,
            pixel_values,
            attention_mask,
            None,
            vision_inputs,
            padding_side="left",
        )
        output = generate(inputs_embeds=embeddings, attention_mask=attention_mask, **kwargs)
        if input_ids is None:
            return output  # from embeddings alone: the new tokens only, as transformers returns them
        # From token ids: the prompt in front of the new tokens, in the tensor and in `sequences` alike.
        new_tokens = output if isinstance(output, torch.Tensor) else output.sequences
        prompt = input_ids.repeat_interleave(new_tokens.shape[0] // input_ids.shape[0], 0)
        sequences = torch.cat([prompt, new_tokens], 1)
        if isinstance(output, torch.Tensor):
            return sequences
        output.sequences = sequences
        return output

    # ------------------------------------------------------------------ parameters
    def hive_named_parameters(self):
        """Every parameter HIVE added, by its name in this model (all carry the `hive_` prefix)."""
        for name, param in self.named_parameters():
            if HIVE_PREFIX in name:
                yield name, param

    def hive_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: param.detach() for name, param in self.hive_named_parameters()}


def mark_hive_trainable(model: nn.Module, requires_grad: bool = True) -> int:
    """Set `requires_grad` on every HIVE parameter of `model` (any wrapper around it, e.g. a PeftModel,
    which freezes everything but LoRA). Returns how many parameters were set."""
    count = 0
    for name, param in model.named_parameters():
        if HIVE_PREFIX in name:
            param.requires_grad_(requires_grad)
            count += 1
    return count


def image_token_id_from_tokenizer(tokenizer, image_token: str = "<image>") -> int:
    """The id of the image marker in `tokenizer`, or a `ValueError` that says how to add it."""
    vocab = tokenizer.get_vocab()
    if image_token not in vocab:
        raise ValueError(
            f"the tokenizer has no {image_token!r} token: add it with tokenizer.add_tokens([{image_token!r}], "
            "special_tokens=True) and resize the model's embeddings (model.resize_token_embeddings(len(tokenizer)))"
        )
    return vocab[image_token]


def _images_per_sample(
    markers: torch.Tensor, num_images: int, *, image_token_id: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Assign images (in marker order, row-major over the batch) to the sample slots that mark them.

    markers: (batch, text) True where a marker stands. Returns image_index (batch, slots), image_valid
    (batch, slots), marker_positions (batch, slots).
    """
    batch, length = markers.shape
    device = markers.device
    if device.type == "meta":
        # No data on `meta` (FLOP counting): assume the images are spread evenly over the batch.
        slots = max(1, math.ceil(num_images / batch))
        image_index = torch.arange(batch * slots, device=device).view(batch, slots).clamp(max=max(num_images - 1, 0))
        return image_index, torch.ones(batch, slots, dtype=torch.bool, device=device), image_index * 0
    counts = markers.sum(dim=1)  # (batch,)
    total = int(counts.sum())
    if total != num_images:
        raise ValueError(
            f"the batch has {total} image marker tokens (id {image_token_id}) but pixel_values holds {num_images} "
            f"images; per sample: {counts.tolist()} markers. Put one marker where each image goes (with inputs_embeds "
            "alone, a marker is a row equal to the marker token's embedding; or pass input_ids alongside)."
        )
    slots = max(1, int(counts.max()))
    offsets = counts.cumsum(0) - counts  # first image of each sample
    slot = torch.arange(slots, device=device)
    image_index = (offsets[:, None] + slot).clamp(max=max(num_images - 1, 0))  # (batch, slots)
    image_valid = slot < counts[:, None]
    columns = torch.where(
        markers, torch.arange(length, device=device), torch.full_like(markers, length, dtype=torch.long)
    )
    marker_positions = columns.sort(dim=1).values[:, :slots]  # (batch, slots); `length` where no marker
    return image_index, image_valid, marker_positions


def splice_image_tokens(
    *,
    markers: torch.Tensor | None,
    embeddings: torch.Tensor,
    images: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    padding_side: str = "right",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Replace each marker by its image's tokens (LLaVA's splice) and pad the rows to one length
    (`"right"` for training, `"left"` for generation).

    markers: (batch, text) True where a marker stands; None (no marker token): each sample's single image
    goes in front of its text. embeddings: (batch, text, hidden); images: (images, tokens, hidden).
    """
    batch, length = embeddings.shape[:2]
    tokens = images.shape[1]
    if embeddings.device.type == "meta":
        return _splice_on_meta(embeddings, images, attention_mask, labels, batch=batch, tokens=tokens)
    if attention_mask is None:
        attention_mask = torch.ones(batch, length, dtype=torch.long, device=embeddings.device)
    rows_embeds, rows_mask, rows_labels = [], [], []
    next_image = 0
    for b in range(batch):
        if markers is None:
            positions = [-1]  # "marker" in front of the text, nothing to drop
        else:
            positions = markers[b].nonzero().flatten().tolist()
        pieces_e, pieces_m, pieces_l = [], [], []
        start = 0
        for position in positions:
            if next_image >= images.shape[0]:
                raise ValueError(
                    f"the batch has more image markers than the {images.shape[0]} images in pixel_values; put one "
                    "marker where each image goes"
                )
            image = images[next_image]
            next_image += 1
            cut = max(position, 0)
            pieces_e += [embeddings[b, start:cut], image]
            pieces_m += [attention_mask[b, start:cut], attention_mask.new_ones(tokens)]
            if labels is not None:
                pieces_l += [labels[b, start:cut], labels.new_full((tokens,), IGNORE_INDEX)]
            start = position + 1
        pieces_e.append(embeddings[b, start:])
        pieces_m.append(attention_mask[b, start:])
        if labels is not None:
            pieces_l.append(labels[b, start:])
        rows_embeds.append(torch.cat(pieces_e))
        rows_mask.append(torch.cat(pieces_m))
        if labels is not None:
            rows_labels.append(torch.cat(pieces_l))
    if next_image != images.shape[0]:
        raise ValueError(
            f"the batch has {next_image} image markers but pixel_values holds {images.shape[0]} images; put one "
            "marker where each image goes"
        )
    width = max(row.shape[0] for row in rows_embeds)
    out_embeds = embeddings.new_zeros(batch, width, embeddings.shape[-1])
    out_mask = attention_mask.new_zeros(batch, width)
    out_labels = labels.new_full((batch, width), IGNORE_INDEX) if labels is not None else None
    for b in range(batch):
        n = rows_embeds[b].shape[0]
        span = slice(0, n) if padding_side == "right" else slice(width - n, width)
        out_embeds[b, span] = rows_embeds[b]
        out_mask[b, span] = rows_mask[b]
        if out_labels is not None:
            out_labels[b, span] = rows_labels[b]
    return out_embeds, out_mask, out_labels


def _splice_on_meta(embeddings, images, attention_mask, labels, *, batch: int, tokens: int):
    """No data on `meta` (FLOP counting): the images, spread evenly over the batch, replace as many
    columns in front of each sample's text; shapes and costs are those of the real splice."""
    per_sample = max(1, images.shape[0] // batch)
    laid_out = images[: batch * per_sample].reshape(batch, per_sample * tokens, -1)  # (batch, images*tokens, hidden)
    out_embeds = torch.cat([laid_out.to(embeddings.dtype), embeddings[:, per_sample:]], dim=1)
    if attention_mask is None:
        attention_mask = embeddings.new_ones(batch, embeddings.shape[1], dtype=torch.long)
    if attention_mask.ndim == 4:  # a ready 4-D mask for the spliced length (what meta FLOP counting passes)
        out_mask = attention_mask
    else:
        out_mask = torch.cat(
            [attention_mask.new_ones(batch, per_sample * tokens), attention_mask[:, per_sample:]], dim=1
        )
    out_labels = None
    if labels is not None:
        out_labels = torch.cat(
            [labels.new_full((batch, per_sample * tokens), IGNORE_INDEX), labels[:, per_sample:]], dim=1
        )
    return out_embeds, out_mask, out_labels
