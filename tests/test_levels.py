"""Unit and property tests of `hive_adapter.model.levels`: pooling on the patch grid and the level encoder, over
random grids, prefix lengths and token budgets (the NaFlex per-image grids are in tests/test_layout_properties.py)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hive_adapter.model.levels import HiveLevelEncoder, pool_patch_grid, prefix_length

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

grids = st.tuples(st.integers(1, 8), st.integers(1, 8))
budgets = st.sampled_from([1, 4, 9, 16, 25])


def reference_pool(patches: torch.Tensor, grid: tuple[int, int], tokens: int) -> torch.Tensor:
    """Adaptive average pooling the plain way: output cell (i, j) of a (th, tw) target averages rows
    floor(i*h/th) .. ceil((i+1)*h/th) and the same for columns; a side already at or below the target is kept."""
    h, w = grid
    side = int(tokens**0.5)
    th, tw = min(side, h), min(side, w)
    image = patches.view(h, w, -1)
    cells = []
    for i in range(th):
        for j in range(tw):
            rows = slice(i * h // th, -(-(i + 1) * h // th))
            cols = slice(j * w // tw, -(-(j + 1) * w // tw))
            cells.append(image[rows, cols].mean(dim=(0, 1)))
    return torch.stack(cells)  # (th*tw, width)


@SETTINGS
@given(grids, budgets, st.integers(0, 2**16))
def test_pooling_averages_each_cell_of_the_grid_and_never_pools_up(grid, tokens, seed):
    h, w = grid
    patches = torch.randn(1, h * w, 3, generator=torch.Generator().manual_seed(seed))
    pooled = pool_patch_grid(patches, grid, tokens)[0]
    side = int(tokens**0.5)
    assert pooled.shape == (min(side, h) * min(side, w), 3)
    torch.testing.assert_close(pooled, reference_pool(patches[0], grid, tokens))


@SETTINGS
@given(grids, budgets, st.integers(0, 3))
def test_every_level_comes_out_with_the_same_token_count_for_any_grid_and_prefix(grid, tokens, prefix):
    """One shared grid (CLIP, SigLIP, DINOv2 with registers): each level is cut after its prefix tokens (CLS,
    registers), pooled to the budget, projected; every level has the same shape."""
    h, w = grid
    encoder = HiveLevelEncoder(
        num_levels=3, projector_type="linear", vision_hidden_size=5, output_size=7, tokens_per_level=tokens,
        keep_prefix_tokens=False, level_embedding=True,
    )  # fmt: skip
    states = [torch.randn(2, prefix + h * w, 5) for _ in range(3)]
    assert prefix_length(prefix + h * w, grid) == prefix
    with torch.no_grad():
        levels, mask = encoder(states, grids=[grid])
    side = int(tokens**0.5)
    expected = min(side, h) * min(side, w)
    assert mask is None
    assert [tuple(level.shape) for level in levels] == [(2, expected, 7)] * 3
    with torch.no_grad():  # the projector reads exactly the pooled grid, without the prefix
        projector = encoder.projectors[1]
        pooled = pool_patch_grid(states[1][:, prefix:], grid, tokens)
        torch.testing.assert_close(levels[1], projector(pooled) + encoder.level_embedding[1])


def test_a_grid_larger_than_the_tokens_is_refused_by_name():
    with pytest.raises(ValueError, match="15 tokens for a 4x4 patch grid"):
        prefix_length(15, (4, 4))
