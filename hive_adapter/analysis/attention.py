"""Cross-attention maps: where each text token looks in the image, per HIVE layer (supplementary §9.2).

The weights of every gated cross-attention block are recorded for one forward pass, averaged over
heads, and laid back onto the image's (pooled) patch grid. With `level_mapping="all"` a block sees
every level; its weights are summed over levels per location. Only connectors with cross-attention
have maps (`hive`, `cascaded`); `concat` is self-attention over spliced tokens.

`attention_entropy` summarises how selective each block is over a batch: the mean entropy of a head's
attention over an image's keys, ln(keys) when it is uniform (it reads nothing in particular).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..data.collator import IGNORE_INDEX


@dataclass
class AttentionMaps:
    """maps: (blocks, text, grid_h, grid_w) head-averaged weights of one image-text pair; row j is the
    query at text position j (which predicts token j + 1)."""

    maps: torch.Tensor
    llm_layers: list[int]
    token_ids: list[int]

    def predicting(self, position: int) -> torch.Tensor:
        """(blocks, grid_h, grid_w): where the model looks while producing the token at `position`."""
        if not 1 <= position < self.maps.shape[1]:
            raise ValueError(f"position {position}: a produced token is at 1..{self.maps.shape[1] - 1}")
        return self.maps[:, position - 1]


def key_grid(tokens: int, patch_grid: tuple[int, int]) -> tuple[int, int]:
    """The 2-D layout of one image's keys: the patch grid, or the square it was pooled to."""
    if tokens == patch_grid[0] * patch_grid[1]:
        return patch_grid
    side = math.isqrt(tokens)
    pooled = (min(side, patch_grid[0]), min(side, patch_grid[1]))
    if pooled[0] * pooled[1] != tokens:
        raise ValueError(f"{tokens} keys per image do not form a grid for a {patch_grid[0]}x{patch_grid[1]} patch grid")
    return pooled


def _require_cross_attention(model: torch.nn.Module) -> None:
    if not model.hive_connector.uses_cross_attention:
        raise ValueError(
            f"connector={model.hive_config.connector!r} has no cross-attention (its image tokens go through self-attention); "
            "attention maps exist for 'hive' and 'cascaded' models"
        )


@torch.no_grad()
def recorded_attention(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], int]:
    """Every HIVE block's attention weights for one forward of `batch`, each (batch, heads, text, keys), and
    the number of keys one image has per level."""
    _require_cross_attention(model)
    input_ids, pixel_values = batch["input_ids"], batch.get("pixel_values")
    if pixel_values is None:
        raise ValueError("recording cross-attention needs pixel_values: the keys are the image's")
    runtime = model.hive_runtime
    context = model.hive_prompt_context(input_ids, None, pixel_values)
    with runtime.pinned_to(context), runtime.recording_attention() as recorded:
        model(input_ids=input_ids, attention_mask=batch.get("attention_mask"))
    blocks = len(model.hive_layers.llm_layers)
    return [recorded[block].float() for block in range(blocks)], context.tokens_per_image


@torch.no_grad()
def cross_attention_maps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> AttentionMaps:
    """Record every HIVE block's attention for one (image, text) pair (batch of one)."""
    _require_cross_attention(model)
    input_ids, pixel_values = batch["input_ids"], batch.get("pixel_values")
    if pixel_values is None or pixel_values.ndim != 4 or input_ids.shape[0] != 1 or pixel_values.shape[0] != 1:
        raise ValueError(
            "cross_attention_maps takes one image (1, channels, height, width) and one text row; got "
            f"input_ids {tuple(input_ids.shape)}, pixel_values {None if pixel_values is None else tuple(pixel_values.shape)}"
        )
    weights_per_block, tokens_per_image = recorded_attention(model, batch)
    patch = model.hive_vision_shape.patch_size
    grid = key_grid(tokens_per_image, (pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch))
    maps = []
    for block_weights in weights_per_block:
        weights = block_weights[0].mean(0)  # (text, keys), heads averaged
        levels = weights.shape[-1] // tokens_per_image  # > 1 with level_mapping="all"
        maps.append(weights.reshape(weights.shape[0], levels, *grid).sum(1))  # (text, grid_h, grid_w)
    layers = model.hive_layers.llm_layers
    return AttentionMaps(maps=torch.stack(maps).cpu(), llm_layers=list(layers), token_ids=input_ids[0].tolist())


@torch.no_grad()
def attention_entropy(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(blocks,) mean entropy in nats of each block's per-head attention over an image's keys, over the queries
    that predict a caption token (`labels` != -100 one position later). ln(keys) is uniform attention."""
    weights_per_block, _ = recorded_attention(model, batch)
    predicts_caption = batch["labels"][:, 1:] != IGNORE_INDEX  # (batch, text - 1): query j predicts token j + 1
    entropies = []
    for weights in weights_per_block:  # (batch, heads, text, keys)
        per_query = -(weights * weights.clamp(min=1e-30).log()).sum(-1)  # (batch, heads, text)
        chosen = per_query[:, :, :-1].transpose(1, 2)[predicts_caption]  # (queries, heads)
        entropies.append(chosen.mean())
    return torch.stack(entropies).cpu()
