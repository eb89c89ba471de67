"""Unit and property tests of `hive_adapter.model.context.HiveVisionContext` beyond the layout invariants of
tests/test_layout_properties.py: several levels read at once (`level_mapping="all"`), per-image real-token masks
(NaFlex), beams and the detached copy a cache carries."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_layout_properties import batches

from hive_adapter.model.context import HiveVisionContext
from hive_adapter.model.layout import marker_slots

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def build(case, data, levels: int = 2) -> HiveVisionContext:
    """The drawn batch's context with `levels` levels and, per image, a random mask of real tokens (at least one)."""
    batch, length, tokens = len(case["columns"]), case["length"], case["tokens"]
    markers = torch.zeros(batch, length, dtype=torch.bool)
    for b, columns in enumerate(case["columns"]):
        markers[b, columns] = True
    images = int(markers.sum())
    real = [data.draw(st.integers(1, tokens)) for _ in range(images)]
    token_mask = torch.arange(tokens)[None] < torch.tensor(real)[:, None]  # (images, tokens), real ones first
    generator = torch.Generator().manual_seed(0)
    level_list = [torch.randn(images, tokens, 3, generator=generator, requires_grad=True) for _ in range(levels)]
    usable = torch.tensor(case["usable"])
    slots = marker_slots(markers, images, image_token_id=0).without(None if bool(usable.all()) else usable)
    return HiveVisionContext.from_images(
        level_list, token_mask, slots, prompt_length=length, media_attention=case["mode"]
    )


@SETTINGS
@given(batches(), st.data())
def test_a_token_never_sees_a_padded_patch_and_has_media_is_any_visible_key(case, data):
    context = build(case, data)
    positions = torch.arange(case["length"] + 2)
    visible, has_media = context.visibility(positions, level_index=0)
    assert not bool((visible & ~context.token_valid[:, None, :]).any())
    assert torch.equal(has_media, visible.any(-1))


@SETTINGS
@given(batches(), st.data())
def test_all_levels_at_once_line_up_with_each_level_alone(case, data):
    """`level_mapping="all"`: keys are the levels side by side (`media(None)`), and the mask of each level's keys
    is that level's own mask."""
    context = build(case, data, levels=3)
    positions = torch.arange(case["length"] + 1)
    visible_all, has_media_all = context.visibility(positions, level_index=None)
    media_all = context.media(None)
    keys = context.levels[0].shape[1]
    assert visible_all.shape[-1] == media_all.shape[1] == 3 * keys
    for level in range(3):
        visible, has_media = context.visibility(positions, level_index=level)
        assert torch.equal(visible_all[..., level * keys : (level + 1) * keys], visible)
        assert torch.equal(has_media_all, has_media)
        assert torch.equal(media_all[:, level * keys : (level + 1) * keys], context.media(level))


@SETTINGS
@given(batches(), st.data(), st.integers(2, 3))
def test_the_detached_copy_sees_the_same_and_carries_no_graph(case, data, beams):
    context = build(case, data)
    detached = context.detached()
    assert all(level.grad_fn is not None for level in context.levels)
    assert all(level.grad_fn is None and not level.requires_grad for level in detached.levels)
    positions = torch.arange(case["length"] + 1)
    for copy in (detached, detached.for_batch(context.batch_size * beams)):
        rows = copy.batch_size // context.batch_size
        visible, has_media = copy.visibility(positions, 0)
        expected_visible, expected_has_media = context.visibility(positions, 0)
        assert torch.equal(visible, expected_visible.repeat_interleave(rows, 0))
        assert torch.equal(has_media, expected_has_media.repeat_interleave(rows, 0))
        assert torch.equal(copy.levels[0], context.levels[0].detach().repeat_interleave(rows, 0))
    assert detached.for_batch(context.batch_size * beams) is detached.for_batch(context.batch_size * beams)
