"""`HiveLlavaProjector`: HIVE in the place where the LLaVA repo keeps its `mm_projector`.

LLaVA's own machinery finds its connector by that name: `--tune_mm_mlp_adapter` trains only
`mm_projector`, `--mm_projector_lr` gives it its own learning rate, LoRA skips it, adapter-only
checkpoints (`mm_projector.bin`) hold it and `--pretrain_mm_mlp_adapter` loads it. Keeping every HIVE
parameter under `model.mm_projector` (one projector per vision level, one gated cross-attention block
per chosen decoder layer) makes all of that work unchanged. The blocks run inside the decoder layers
through forward hooks (`attach_hive_hooks`), so the LLM's parameter names, and with them its
checkpoints, stay exactly as upstream.

Everything the module needs to rebuild itself is stored in the LLaVA config (`config.hive_config`),
so `LlavaLlamaForCausalLM.from_pretrained` and `llava.model.builder.load_pretrained_model` rebuild it
without the command line that trained it.
"""

from __future__ import annotations

import json
import logging
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...architectures import VisionShape, text_shape_of, vision_shape_of
from ...config import HiveConfig
from ...connector import (
    block_factory,
    build_level_encoder,
    cross_attention_kernel,
    init_hive_weights,
)
from ...context import HiveRuntime, HiveVisionContext, past_length_of
from ...inject import HiveAttachment, attach_hive_hooks
from ...model import check_finite

logger = logging.getLogger(__name__)

# llava.constants: the id `tokenizer_image_token` puts where "<image>" stood, and the label to ignore.
IMAGE_TOKEN_INDEX = -200
IGNORE_INDEX = -100

PROJECTOR_TYPE = "hive"  # config.mm_projector_type of a LLaVA model whose connector is HIVE
# LLaVA's --mm_vision_select_feature -> HiveConfig.vision_feature_select
FEATURE_SELECT = {"patch": "patch", "cls_patch": "full"}


def hive_llava_settings(hive_config: HiveConfig, vision_config, num_llm_layers: int) -> dict[str, Any]:
    """What `config.hive_config` of a LLaVA model holds: the HIVE knobs, with the layer lists resolved
    (a checkpoint never depends on this library's defaults), and the vision encoder's shape."""
    vision = vision_shape_of(vision_config)
    resolved = hive_config.resolve_layers(num_vision_layers=vision.num_layers, num_llm_layers=num_llm_layers)
    return {
        **hive_config.adapter_dict(),
        "vision_layers": list(resolved.vision_layers),
        "llm_layers": list(resolved.llm_layers),
        "vision_shape": {
            "num_layers": vision.num_layers,
            "hidden_size": vision.hidden_size,
            "patch_size": vision.patch_size,
            "image_size": vision.image_size,
        },
    }


# A buffer of the projector holding its settings (JSON bytes as floats, exact in fp16/bf16 too). It is in every
# state dict, and `add_projector_settings` puts it into `mm_projector.bin` (which LLaVA builds from the
# parameters alone), so the file carries the settings it was trained with.
SETTINGS_PARAMETER = "hive_settings"
_LIVE_PROJECTORS: weakref.WeakSet = weakref.WeakSet()


def encode_settings(settings: dict[str, Any]) -> torch.Tensor:
    data = json.dumps(settings, sort_keys=True).encode()
    return torch.tensor(list(data), dtype=torch.float32)  # (bytes,)


def decode_settings(tensor: torch.Tensor, *, source: str) -> dict[str, Any]:
    try:
        return json.loads(bytes(int(value) for value in tensor.round().tolist()).decode())
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{source}: its {SETTINGS_PARAMETER} do not decode ({error}); the file is damaged") from error


def add_projector_settings(state: dict[str, torch.Tensor], named_parameters: list) -> dict[str, torch.Tensor]:
    """`state` (LLaVA's adapter dict, built from `named_parameters`) with the HIVE projector's settings added
    next to its weights, when one of them is there."""
    for name, parameter in named_parameters:
        if "mm_projector.hive_" not in name or name not in state:
            continue
        owner = next((p for p in _LIVE_PROJECTORS if any(q is parameter for q in p.parameters())), None)
        if owner is not None:
            prefix = name[: name.index("mm_projector.") + len("mm_projector.")]
            state[prefix + SETTINGS_PARAMETER] = owner.hive_settings.detach().float().cpu().clone()
        break
    return state


def settings_in_adapter_file(path: str | Path) -> dict[str, Any] | None:
    """The HIVE settings saved inside an `mm_projector.bin`, or None (LLaVA's own connector, or hive-adapter 0.1)."""
    weights = torch.load(path, map_location="cpu", weights_only=True)
    for name, tensor in weights.items():
        if name.endswith(f"mm_projector.{SETTINGS_PARAMETER}"):
            return decode_settings(tensor, source=str(path))
    return None


class HiveLlavaProjector(nn.Module):
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
        self.hive_blocks = nn.ModuleList(make_block() for _ in self.resolved.llm_layers)
        for module in (self.hive_levels, *self.hive_blocks):
            init_hive_weights(module, self.hive_config)
        self.settings = dict(config.hive_config)
        self.register_buffer(SETTINGS_PARAMETER, encode_settings(self.settings))
        self.register_load_state_dict_pre_hook(self._check_loaded)
        _LIVE_PROJECTORS.add(self)
        self.runtime = HiveRuntime()
        self._injection: HiveAttachment | None = None

    def _check_loaded(self, module, state_dict, prefix, *args) -> None:
        """Before weights load into this projector: refuse NaN/inf and settings other than its own; a file
        without settings (hive-adapter 0.1) gets the projector's own, so it still loads."""
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
    @property
    def attached(self) -> bool:
        return self._injection is not None

    def attach(self, llava_model: nn.Module) -> None:
        """Run each block in its decoder layer of `llava_model` (the `LlavaLlamaModel`, with `.layers`)."""
        if self._injection is not None:
            return
        self._injection = attach_hive_hooks(
            model=llava_model,
            layers=llava_model.layers,
            layers_path="model.layers",
            llm_layers=self.resolved.llm_layers,
            level_of_block=self.resolved.level_of_block,
            blocks=list(self.hive_blocks),
            placement=self.hive_config.placement,
            runtime=self.runtime,
        )
        logger.info(
            "HIVE (LLaVA): vision layers %s -> decoder layers %s",
            list(self.resolved.vision_layers),
            list(self.resolved.llm_layers),
        )

    def detach(self) -> None:
        if self._injection is not None:
            self._injection.remove()
            self._injection = None
        self.runtime.clear()

    # ------------------------------------------------------------------ vision side
    def encode(self, vision_tower: nn.Module, images: torch.Tensor | list[torch.Tensor] | None) -> list[torch.Tensor]:
        """Run LLaVA's CLIP tower once (with gradients when it trains) and project the chosen levels.

        images: (images, 3, H, W), a list of equally sized (3, H, W) tensors, or None (one blank image,
        so every HIVE parameter takes part on every rank). Returns one (images, tokens, llm_width) per level.
        """
        encoder = getattr(vision_tower, "vision_tower", vision_tower)  # LLaVA's CLIPVisionTower wraps the HF model
        parameter = next(encoder.parameters())
        if images is None:
            size = self.vision_shape.image_size
            images = torch.zeros(1, 3, size, size, device=parameter.device)
        elif isinstance(images, (list, tuple)):
            shapes = {tuple(image.shape[-3:]) for image in images}
            if len(shapes) != 1:
                raise ValueError(f"images of different sizes {sorted(shapes)}: HIVE needs one size per batch")
            images = torch.stack([image.reshape(image.shape[-3:]) for image in images])
        if images.ndim != 4:
            raise NotImplementedError(
                f"images of shape {tuple(images.shape)}: the HIVE connector takes one crop per image "
                "(--image_aspect_ratio square or pad); LLaVA-1.6 'anyres' crops are not supported"
            )
        outputs = encoder(images.to(device=parameter.device, dtype=parameter.dtype), output_hidden_states=True)
        states = [outputs.hidden_states[index + 1] for index in self.resolved.vision_layers]
        patch = self.vision_shape.patch_size
        grid = (images.shape[-2] // patch, images.shape[-1] // patch)
        levels, _ = self.hive_levels(states, grids=[grid])
        return levels

    # ------------------------------------------------------------------ text side
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
        if self.runtime.pinned or (past_length_of(past_key_values) > 0 and images is None):
            if self.runtime.context is None:
                raise RuntimeError("a decoding step (past_key_values given) arrived before any prompt with images")
            return input_ids, position_ids, attention_mask, past_key_values, None, labels
        if input_ids is None:
            raise ValueError(
                "the HIVE connector needs input_ids to place the images (inputs_embeds alone carry no markers)"
            )
        text = drop_image_markers(input_ids, attention_mask, labels, position_ids, padding_side=padding_side)
        if images is None and bool(text.marker_counts.any()):
            raise ValueError(
                f"the batch marks {text.marker_counts.tolist()} images per sample (<image> tokens) but no images were given"
            )
        levels = self.encode(llava_model.get_vision_tower(), images)
        context = layout_llava_images(levels, text, has_images=images is not None, hive_config=self.hive_config)
        self.runtime.set_context(context)
        return text.input_ids, text.position_ids, text.attention_mask, past_key_values, None, text.labels


@dataclass
class TextWithoutMarkers:
    """A batch with its `<image>` markers taken out, and where they stood (see `drop_image_markers`)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None
    position_ids: torch.Tensor | None
    marker_positions: torch.Tensor  # (batch, max markers): the column each marker stood at
    marker_counts: torch.Tensor  # (batch,)


def drop_image_markers(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    *,
    padding_side: str,
) -> TextWithoutMarkers:
    """Remove every IMAGE_TOKEN_INDEX from a padded batch, keeping rows padded on `padding_side`.

    The markers are moved to the padding side (masked out, label ignored) and as many columns as every
    row can spare are cut. `marker_positions` (batch, max markers) is the column where each marker
    stood, i.e. where the text after it now starts; tokens at or after it see the image.
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side={padding_side!r}: expected 'right' or 'left'")
    batch, length = input_ids.shape
    markers = input_ids == IMAGE_TOKEN_INDEX  # (batch, text)
    counts = markers.sum(dim=1)  # (batch,)
    keep = ~markers
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
    # Stable sort: text keeps its order, markers go to the padding side.
    sort_key = markers if padding_side == "right" else keep
    order = torch.sort(sort_key.to(torch.int8), dim=1, stable=True).indices  # (batch, text)
    moved = torch.gather(markers, 1, order)
    ids = torch.gather(input_ids, 1, order).masked_fill(moved, 0)
    mask = torch.gather(attention_mask, 1, order).masked_fill(moved, 0)
    new_labels = None if labels is None else torch.gather(labels, 1, order).masked_fill(moved, IGNORE_INDEX)

    # Column of each marker in the new layout: text before it (plus the markers moved in front, left side).
    text_before = torch.cumsum(keep.long(), dim=1)  # inclusive; at a marker == exclusive
    offset = counts[:, None] if padding_side == "left" else 0
    columns = torch.where(markers, text_before + offset, torch.full_like(text_before, length + 1))
    slots = max(1, int(counts.max())) if batch else 1
    marker_positions = columns.sort(dim=1).values[:, :slots]  # (batch, slots); `length + 1` where no marker

    spare = int(counts.min()) if batch else 0  # columns that hold a marker in every row
    if spare:
        if padding_side == "right":
            ids, mask = ids[:, : length - spare], mask[:, : length - spare]
            new_labels = None if new_labels is None else new_labels[:, : length - spare]
        else:
            ids, mask = ids[:, spare:], mask[:, spare:]
            new_labels = None if new_labels is None else new_labels[:, spare:]
            marker_positions = marker_positions - spare
    new_positions = None
    if position_ids is not None:
        new_positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0).to(position_ids.dtype)
    return TextWithoutMarkers(
        input_ids=ids,
        attention_mask=mask,
        labels=new_labels,
        position_ids=new_positions,
        marker_positions=marker_positions,
        marker_counts=counts,
    )


def layout_llava_images(
    levels: list[torch.Tensor], text: TextWithoutMarkers, *, has_images: bool, hive_config: HiveConfig
) -> HiveVisionContext:
    """Pair images with samples the way LLaVA does: in order, `max(1, markers)` images per sample.

    LLaVA's dataset gives a text-only sample of a multimodal batch a blank image and no marker; that
    image is consumed and seen by nobody. Without images at all, one blank image is seen by nobody.
    """
    counts = text.marker_counts
    batch = counts.shape[0]
    device = counts.device
    num_images = levels[0].shape[0]
    slots = text.marker_positions.shape[1]
    slot = torch.arange(slots, device=device)
    if not has_images:
        image_index = torch.zeros(batch, slots, dtype=torch.long, device=device)
        image_valid = torch.zeros(batch, slots, dtype=torch.bool, device=device)
    else:
        consumed = counts.clamp(min=1)
        if int(consumed.sum()) != num_images:
            raise ValueError(
                f"{num_images} images for a batch whose samples mark {counts.tolist()} images with <image>; LLaVA "
                "pairs images with samples in order, one per marker (one placeholder image for a sample without)"
            )
        first = consumed.cumsum(0) - consumed  # (batch,) index of each sample's first image
        image_index = (first[:, None] + slot).clamp(max=num_images - 1)  # (batch, slots)
        image_valid = slot < counts[:, None]
    return HiveVisionContext.from_images(
        levels,
        None,
        image_index=image_index,
        image_valid=image_valid,
        marker_positions=text.marker_positions,
        prompt_length=text.input_ids.shape[1],
        media_attention=hive_config.media_attention,
    )


def hive_projector_of(model: nn.Module) -> HiveLlavaProjector | None:
    """The HIVE connector of a LLaVA model (LlavaLlamaForCausalLM, its inner model, or a PEFT wrapper)."""
    inner = model.get_model() if hasattr(model, "get_model") else model
    projector = getattr(inner, "mm_projector", None)
    return projector if isinstance(projector, HiveLlavaProjector) else None
