"""`HiveLlavaModules`: HIVE's modules in the place where the LLaVA repo keeps its `mm_projector`.

LLaVA's own machinery finds its connector by that name: `--tune_mm_mlp_adapter` trains only
`mm_projector`, `--mm_projector_lr` gives it its own learning rate, LoRA skips it, adapter-only
checkpoints (`mm_projector.bin`) hold it and `--pretrain_mm_mlp_adapter` loads it. Keeping every HIVE
parameter under `model.mm_projector` (one projector per vision level, one gated cross-attention block
per chosen decoder layer) makes all of that work unchanged. It is not a token projector (its forward
refuses): the blocks run inside the decoder layers through forward hooks (`attach_hive_hooks`), so the
LLM's parameter names, and with them its checkpoints, stay exactly as upstream.

The vision side (tower, levels, per-sample layout) and the per-prompt state are the library's own
(`vision.py`, `layout.py`, `runtime.py`), the same as for the Hugging Face models: only the markers differ
(LLaVA's `IMAGE_TOKEN_INDEX`, dropped from the sequence, see `markers.py`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ...model.architectures import VisionShape, text_shape_of
from ...model.attach import HiveAttachment, attach_hive_hooks
from ...model.builders import block_factory, build_level_encoder, cross_attention_kernel, init_hive_weights
from ...model.config import HiveConfig
from ...model.context import HiveVisionContext
from ...model.cross_attention import keep_float32
from ...model.layout import images_by_marker
from ...model.parameters import check_finite
from ...model.runtime import HiveRuntime
from ...model.vision import HiveVisionSide, build_vision_context
from .markers import TextWithoutMarkers, drop_image_markers
from .settings import SETTINGS_PARAMETER, decode_settings, encode_settings

logger = logging.getLogger(__name__)


class HiveLlavaModules(nn.Module):
    """HIVE's modules for a LLaVA model: `hive_levels` (per-level projectors) and `hive_blocks`.

    Built from the LLaVA (LLM) config alone; `attach(llava_model)` hooks the blocks into the decoder
    layers they belong to and `detach()` removes the hooks again.
    """

    def __init__(self, config):
        super().__init__()
        settings = dict(config.hive_config)
        vision = VisionShape(**settings.pop("vision_shape"))
        settings.pop("model_type", None)
        self.hive_config = HiveConfig(**settings)
        text = text_shape_of(config, config.num_hidden_layers)
        self.resolved = self.hive_config.resolve_layers(
            num_vision_layers=vision.num_layers, num_llm_layers=text.num_layers
        )
        self.vision_shape = vision
        self.hive_levels = build_level_encoder(self.hive_config, self.resolved, vision, text)
        make_block = block_factory(self.hive_config, vision, text, cross_attention_kernel(self.hive_config, config))
        # Named by the decoder layer each block runs in (`hive_blocks.3.*`), as on the Hugging Face front end.
        self.hive_blocks = nn.ModuleDict({str(index): make_block() for index in self.resolved.llm_layers})
        for module in (self.hive_levels, *self.hive_blocks.values()):
            init_hive_weights(module, self.hive_config)
            keep_float32(module)  # built under LLaVA's torch_dtype: gates and norms back to float32
        self.settings = dict(config.hive_config)
        self.register_buffer(SETTINGS_PARAMETER, encode_settings(self.settings))
        self.register_load_state_dict_pre_hook(self._blocks_by_decoder_layer)
        self.register_load_state_dict_pre_hook(self._check_loaded)
        self.runtime = HiveRuntime()
        self._attachment: HiveAttachment | None = None

    def saved_by_position(self, keys, prefix: str = "") -> bool:
        """Whether a state dict with `keys` names this connector's blocks by position (`<prefix>hive_blocks.<k>`,
        the k-th block), as hive-adapter wrote LLaVA checkpoints before it named them by decoder layer. Decided
        on the whole set: blocks exactly `0..n-1` where the decoder layers are not (layers are ascending, so the
        two sets differ whenever the names do); any other set is left to strict loading."""
        head = prefix + "hive_blocks."
        found = {key[len(head) :].split(".", 1)[0] for key in keys if key.startswith(head)}
        layers = {str(index) for index in self.resolved.llm_layers}
        return found != layers and found == {str(position) for position in range(len(layers))}

    def _blocks_by_decoder_layer(self, module, state_dict, prefix, *args) -> None:
        """Before weights load: blocks saved by position (`saved_by_position`) are renamed to their decoder layer."""
        if not self.saved_by_position(state_dict, prefix):
            return
        head = prefix + "hive_blocks."
        layers = [str(index) for index in self.resolved.llm_layers]
        moved = {key: state_dict.pop(key) for key in [key for key in state_dict if key.startswith(head)]}
        for key, tensor in moved.items():
            position, rest = key[len(head) :].split(".", 1)
            state_dict[f"{head}{layers[int(position)]}.{rest}"] = tensor
        logger.info("HIVE (LLaVA): blocks saved by position loaded into decoder layers %s", layers)

    def _check_loaded(self, module, state_dict, prefix, *args) -> None:
        """Before weights load into these modules: refuse NaN/inf and settings other than their own; a file
        without settings (hive-adapter 0.1) gets the modules' own, so it still loads."""
        check_finite(
            ((name, tensor) for name, tensor in state_dict.items() if name.startswith(prefix)), source="mm_projector"
        )
        key = prefix + SETTINGS_PARAMETER
        if key not in state_dict:
            state_dict[key] = self.hive_settings.detach().clone()
            return
        if self.hive_settings.numel() == 0:  # partitioned (ZeRO-3): nothing to compare here
            return
        saved = decode_settings(state_dict[key], source="the weights being loaded")
        if saved != self.settings:
            changed = {
                k: (saved.get(k), self.settings.get(k))
                for k in {*saved, *self.settings}
                if saved.get(k) != self.settings.get(k)
            }
            raise ValueError(
                "these HIVE projector weights were trained with other settings: "
                + ", ".join(f"{k}: weights {old!r}, model {new!r}" for k, (old, new) in sorted(changed.items()))
            )

    def forward(self, *args, **kwargs):
        raise RuntimeError(
            "the HIVE connector is not a token projector: images reach the LLM through cross-attention inside its "
            "decoder layers. Call the LLaVA model itself (model(input_ids, images=...) or model.generate(..., "
            "images=...)) after hive_adapter.integrations.llava.apply_patch()."
        )

    # ------------------------------------------------------------------ wiring
    def attach(self, llava_model: nn.Module) -> None:
        """Run each block in its decoder layer of `llava_model` (the `LlavaLlamaModel`, with `.layers`)."""
        if self._attachment is not None:
            return
        self._attachment = attach_hive_hooks(
            model=llava_model,
            layers=llava_model.layers,
            layers_path="model.layers",
            llm_layers=self.resolved.llm_layers,
            level_of_block=self.resolved.level_of_block,
            blocks=self.hive_blocks,  # looked up on every call (a module put in a block's place runs)
            placement=self.hive_config.placement,
            runtime=self.runtime,
        )
        logger.info(
            "HIVE (LLaVA): vision layers %s -> decoder layers %s",
            list(self.resolved.vision_layers),
            list(self.resolved.llm_layers),
        )

    def detach(self) -> None:
        if self._attachment is not None:
            self._attachment.remove()
            self._attachment = None
        self.runtime.clear()

    def vision_side(self, vision_tower: nn.Module) -> HiveVisionSide:
        """LLaVA's `CLIPVisionTower` wraps the HF encoder (`.vision_tower`); HIVE runs the encoder itself, with
        gradients when it trains (LLaVA's wrapper runs it under `torch.no_grad`)."""
        encoder = getattr(vision_tower, "vision_tower", vision_tower)
        return HiveVisionSide(
            tower=encoder, shape=self.vision_shape, vision_layers=self.resolved.vision_layers, levels=self.hive_levels
        )

    # ------------------------------------------------------------------ a prompt
    def prompt(
        self,
        llava_model: nn.Module,
        input_ids: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor | None,
        images: torch.Tensor | list[torch.Tensor] | None,
        *,
        padding_side: str,
    ) -> tuple[TextWithoutMarkers, HiveVisionContext]:
        """A new prompt: the text without its `<image>` markers, and its vision context. Changes no state.

        images: (images, 3, H, W), a list of equally sized (3, H, W) tensors, or None. LLaVA pairs images with
        samples in order, `max(1, markers)` per sample: a text-only sample of a multimodal batch gets a blank
        image and no marker, which is consumed and seen by nobody.
        """
        if input_ids is None:
            raise ValueError(
                "the HIVE connector needs input_ids to place the images (inputs_embeds alone carry no markers)"
            )
        text = drop_image_markers(input_ids, attention_mask, labels, position_ids, padding_side=padding_side)
        if images is None and bool(text.marker_counts.any()):
            raise ValueError(
                f"the batch marks {text.marker_counts.tolist()} images per sample (<image> tokens) but no images were given"
            )

        pixel_values = stack_images(images)
        slots = None
        if pixel_values is not None:  # which sample sees which image, from which column
            slots = images_by_marker(
                text.marker_counts,
                text.marker_positions,
                pixel_values.shape[0],
                unmarked_takes_one=True,
                mismatch="{images} images for a batch whose samples mark {per_sample} images with <image>; LLaVA "
                "pairs images with samples in order, one per marker (one placeholder image for a sample without)",
            )
        context = build_vision_context(
            self.vision_side(llava_model.get_vision_tower()),
            pixel_values,
            {},
            slots=slots,
            batch_size=input_ids.shape[0],
            prompt_length=text.input_ids.shape[1],
            device=input_ids.device,
            media_attention=self.hive_config.media_attention,
            training=self.training,
        )
        return text, context

    def prepare_inputs(
        self,
        llava_model: nn.Module,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        past_key_values: Any,
        labels: torch.Tensor | None,
        images: torch.Tensor | list[torch.Tensor] | None,
        *,
        padding_side: str,
    ):
        """HIVE's `prepare_inputs_labels_for_multimodal`: same arguments and return tuple as LLaVA's.

        Instead of splicing image features into the sequence, the `<image>` markers are dropped (the text
        after a marker sees its image through cross-attention) and the images are encoded into the
        vision context the hooked decoder layers read. Decoding steps keep the prompt's context.
        """
        # LLaVA's forward cannot be wrapped here: the scope opened now is closed by the hook after the decoder
        # stack (`HiveRuntime.open_forward`), also when the stack raises.
        prompt = self.runtime.prompt_for_call(past_key_values=past_key_values, has_images=images is not None)
        if prompt is not None:
            self.runtime.open_forward(prompt)
            return input_ids, position_ids, attention_mask, past_key_values, None, labels
        text, context = self.prompt(
            llava_model, input_ids, position_ids, attention_mask, labels, images, padding_side=padding_side
        )
        self.runtime.open_forward(context)
        return text.input_ids, text.position_ids, text.attention_mask, past_key_values, None, text.labels


def stack_images(images: torch.Tensor | list[torch.Tensor] | None) -> torch.Tensor | None:
    """LLaVA's `images` as one (images, 3, H, W) tensor: a list of equally sized crops is stacked."""
    if images is None:
        return None
    if isinstance(images, (list, tuple)):
        shapes = {tuple(image.shape[-3:]) for image in images}
        if len(shapes) != 1:
            raise ValueError(f"images of different sizes {sorted(shapes)}: HIVE needs one size per batch")
        images = torch.stack([image.reshape(image.shape[-3:]) for image in images])
    if images.ndim != 4:
        raise NotImplementedError(
            f"images of shape {tuple(images.shape)}: the HIVE connector takes one crop per image "
            "(--image_aspect_ratio square or pad); LLaVA-1.6 'anyres' crops are not supported"
        )
    return images


def hive_modules_of(model: nn.Module) -> HiveLlavaModules | None:
    """The HIVE connector of a LLaVA model (LlavaLlamaForCausalLM, its inner model, or a PEFT wrapper)."""
    inner = model.get_model() if hasattr(model, "get_model") else model
    modules = getattr(inner, "mm_projector", None)
    return modules if isinstance(modules, HiveLlavaModules) else None
