"""Hierarchical vision features: pick encoder levels, pool them on the patch grid, project each.

Paper §3 / supplementary §8.1: HIVE reads a subset S of vision-encoder layers (shallow to deep), not
only the last one, and maps each through a lightweight projector into the LLM width. Projector names
and shapes follow LLaVA's factory (`linear`, `mlp2x_gelu`) so users recognise them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class HiveProjector(nn.Module):
    """One level's projector: vision width -> `output_size` (LLaVA's `linear` / `mlp2x_gelu` to the LLM width,
    or `lean`: one layer to the narrower width the cross-attention's K/V read)."""

    def __init__(self, *, projector_type: str, vision_hidden_size: int, output_size: int):
        super().__init__()
        if projector_type == "linear":
            self.layers = nn.Sequential(nn.Linear(vision_hidden_size, output_size))
        elif projector_type == "mlp2x_gelu":
            self.layers = nn.Sequential(
                nn.Linear(vision_hidden_size, output_size),
                nn.GELU(),
                nn.Linear(output_size, output_size),
            )
        elif projector_type == "lean":
            self.layers = nn.Sequential(nn.Linear(vision_hidden_size, output_size), nn.GELU())
        else:
            raise ValueError(f"projector_type={projector_type!r}: expected 'linear', 'mlp2x_gelu' or 'lean'")

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


def prefix_length(num_tokens: int, grid_hw: tuple[int, int]) -> int:
    """Tokens in front of the patch grid (CLS, registers), found by counting: CLIP 1, SigLIP 0, DINOv2 1 + r."""
    prefix = num_tokens - grid_hw[0] * grid_hw[1]
    if prefix < 0:
        raise ValueError(
            f"the vision encoder returned {num_tokens} tokens for a {grid_hw[0]}x{grid_hw[1]} patch grid; "
            "does the image size match the encoder's patch size?"
        )
    return prefix


def pool_patch_grid(patches: torch.Tensor, grid_hw: tuple[int, int], tokens: int) -> torch.Tensor:
    """Average-pool patch tokens on their 2-D grid down to `tokens` (a square number); never up:
    a grid side already at or below the target side is kept."""
    batch, _, width = patches.shape
    side = math.isqrt(tokens)
    target = (min(side, grid_hw[0]), min(side, grid_hw[1]))
    if target == tuple(grid_hw):
        return patches
    grid = patches.transpose(1, 2).reshape(batch, width, *grid_hw)  # (images, width, grid_h, grid_w)
    pooled = F.adaptive_avg_pool2d(grid, target)  # (images, width, target_h, target_w)
    return pooled.flatten(2).transpose(1, 2)  # (images, target_h*target_w, width)


class HiveLevelEncoder(nn.Module):
    """Selected encoder levels -> pooled, projected features, one tensor per level.

    Holds one projector per level and, when every decoder depth attends to all levels
    (`level_mapping="all"`), a learned embedding that tells the levels apart.
    """

    def __init__(
        self,
        *,
        num_levels: int,
        projector_type: str,
        vision_hidden_size: int,
        output_size: int,
        tokens_per_level: int | None,
        keep_prefix_tokens: bool,
        level_embedding: bool,
    ):
        super().__init__()
        self.tokens_per_level = tokens_per_level
        self.keep_prefix_tokens = keep_prefix_tokens
        self.projectors = nn.ModuleList(
            HiveProjector(
                projector_type=projector_type,
                vision_hidden_size=vision_hidden_size,
                output_size=output_size,
            )
            for _ in range(num_levels)
        )
        self.level_embedding = nn.Parameter(torch.zeros(num_levels, output_size)) if level_embedding else None

    def forward(
        self,
        level_states: list[torch.Tensor],
        *,
        grids: list[tuple[int, int]],
        patch_mask: torch.Tensor | None = None,
        poolable: bool = True,
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Select, pool and project every level.

        level_states[i]: (images, tokens, vision_width); grids: the shared patch grid (one entry) or, with
        `patch_mask` (images, tokens) from encoders that pad patches (SigLIP2), one grid per image.
        `poolable=False`: the tokens lie on no single grid (an image's several crops); `tokens_per_level` refused.
        Returns a list of (images, n, output_size) and the (images, n) mask of real tokens (None: all real).
        """
        if not poolable and self.tokens_per_level is not None:
            raise ValueError(
                f"tokens_per_level={self.tokens_per_level}: these images' tokens lie on no single patch grid (an image "
                "split into crops, or padded crops), so HIVE cannot pool them; use tokens_per_level=None, or give "
                "one unpadded crop per image (the image processor's do_image_splitting=False)"
            )
        outputs = []
        for index, (states, projector) in enumerate(zip(level_states, self.projectors, strict=True)):
            states, token_mask = self._select(states, grids, patch_mask)
            projected = projector(states.to(projector.layers[0].weight.dtype))
            if self.level_embedding is not None:
                projected = projected + self.level_embedding[index].to(projected.dtype)
            outputs.append(projected)
        return outputs, token_mask

    def _select(self, states, grids, patch_mask):
        if patch_mask is None:
            # One grid for every image, special tokens (if any) in front of it: CLIP, SigLIP, DINOv2.
            (grid,) = grids
            if not self.keep_prefix_tokens:
                states = states[:, prefix_length(states.shape[1], grid) :]
            if self.tokens_per_level is not None:
                states = pool_patch_grid(states, grid, self.tokens_per_level)
            return states, None
        # Each image has its own grid, padded patches at the end (SigLIP2 NaFlex): pool real patches only.
        if self.tokens_per_level is None:
            return states, patch_mask.bool()
        pooled = [
            pool_patch_grid(states[i : i + 1, : h * w], (h, w), self.tokens_per_level) for i, (h, w) in enumerate(grids)
        ]  # each (1, n_i, width): a grid side below the target side is kept, so n_i differs between grids
        return pad_to_one_length(pooled)


def pad_to_one_length(pooled: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images pooled to different token counts (2x8 and 4x4 grids pool to 2x4 and 4x4) as one tensor
    (images, longest, width), zero-padded at the end, and the (images, longest) mask of real tokens (None when
    every image has the same count)."""
    lengths = [part.shape[1] for part in pooled]
    longest = max(lengths)
    if min(lengths) == longest:
        return torch.cat(pooled, dim=0), None
    padded = torch.cat([F.pad(part, (0, 0, 0, longest - part.shape[1])) for part in pooled], dim=0)
    real = torch.arange(longest, device=padded.device) < torch.tensor(lengths, device=padded.device)[:, None]
    return padded, real
