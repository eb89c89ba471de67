"""What a linear probe reads: a frozen vision encoder (an exported one, a stock one, or a HIVE checkpoint's) and
its features per image, at its output or at any of its layers, from one encoder pass (`hive-probe`)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..model.loading import load_vision_encoder


def load_frozen_encoder(path: str | Path, device: str | torch.device = "cpu"):
    """(encoder, image_processor) from a vision model directory, a full CLIP/SigLIP one, or a HIVE checkpoint."""
    from transformers import AutoConfig, AutoImageProcessor

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json, not a model directory")
    if AutoConfig.from_pretrained(path).model_type == "hive":
        from ..model.modeling_hive import HiveForConditionalGeneration

        encoder = HiveForConditionalGeneration.from_pretrained(path).export_vision_model()
    else:
        encoder = load_vision_encoder(path)  # a full CLIP/SigLIP checkpoint gives its vision half
    try:
        processor = AutoImageProcessor.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: no image processor (preprocessor_config.json) to prepare images with") from error
    encoder.requires_grad_(False)
    return encoder.to(device).eval(), processor


def encoder_depth(encoder) -> int:
    """How many layers the vision encoder has (its config's num_hidden_layers)."""
    config = getattr(encoder, "config", None)
    depth = getattr(config, "num_hidden_layers", None)
    if depth is None:
        raise ValueError(f"{type(encoder).__name__}: its config names no num_hidden_layers; probe its output instead")
    return depth


@torch.no_grad()
def encode_layers(
    encoder, processor, images, *, features: str, layers: list[int | None], chunk: int = 256
) -> torch.Tensor:
    """(images, len(layers), width) features of PIL images, one per entry of `layers`: None reads the encoder's
    output, k the output of encoder layer k (0-based, before the encoder's final norm). One encoder pass."""
    if any(layer is not None for layer in layers):
        depth = encoder_depth(encoder)
        for layer in layers:
            if layer is not None and not 0 <= layer < depth:
                raise ValueError(f"layer={layer}: the encoder has {depth} layers (0 to {depth - 1})")
    device = next(encoder.parameters()).device
    dtype = next(encoder.parameters()).dtype
    hidden_states = any(layer is not None for layer in layers)
    out = []
    for start in range(0, len(images), chunk):
        pixels = processor(images=images[start : start + chunk], return_tensors="pt")["pixel_values"]
        output = encoder(pixel_values=pixels.to(device=device, dtype=dtype), output_hidden_states=hidden_states)
        pooled = []
        for layer in layers:
            if layer is not None:
                tokens = output.hidden_states[layer + 1]  # (images, tokens, width); [0] is the embeddings
                pooled.append(tokens[:, 0] if features == "cls" else tokens.mean(1))
            elif features == "pooler":
                pooler = getattr(output, "pooler_output", None)
                if pooler is None:
                    raise ValueError(f"{type(encoder).__name__} has no pooler_output; use features='mean' or 'cls'")
                pooled.append(pooler)
            elif features == "cls":
                pooled.append(output.last_hidden_state[:, 0])
            else:
                pooled.append(output.last_hidden_state.mean(1))  # (images, width)
        out.append(torch.stack(pooled, 1).float().cpu())  # (images, layers, width)
    return torch.cat(out)


def encode(encoder, processor, images, *, features: str, layer: int | None = None, chunk: int = 256) -> torch.Tensor:
    """(images, width) features of PIL images: of the encoder's output, or of encoder layer `layer`'s output."""
    return encode_layers(encoder, processor, images, features=features, layers=[layer], chunk=chunk)[:, 0]
