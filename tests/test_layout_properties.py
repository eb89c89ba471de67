"""Property-based tests of the layout invariants every front end relies on (docs/ARCHITECTURE.md §7.2-7.3),
over random batches: markers per sample at any columns, images left out (non-finite) at any position, several
images per sample, beams, generated columns, and patch grids of any shape.

Each property is checked against a reference written the plain way (loops over samples and columns), not
against the library's own tensor code. Examples are bounded so the file runs in seconds.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hive_adapter.model.context import HiveVisionContext
from hive_adapter.model.layout import marker_slots
from hive_adapter.model.levels import HiveLevelEncoder, pool_patch_grid

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def batches(draw):
    """A batch of prompts: marker columns per sample (at least one image in the batch), which images are usable,
    how many tokens an image has, and the masking mode."""
    batch = draw(st.integers(1, 4))
    length = draw(st.integers(1, 10))
    columns = [sorted(draw(st.sets(st.integers(0, length - 1), max_size=min(3, length)))) for _ in range(batch)]
    if not any(columns):
        columns[draw(st.integers(0, batch - 1))] = [draw(st.integers(0, length - 1))]
    images = sum(len(c) for c in columns)
    usable = draw(st.lists(st.booleans(), min_size=images, max_size=images))
    return {
        "columns": columns,
        "length": length,
        "usable": usable,
        "tokens": draw(st.integers(1, 3)),
        "mode": draw(st.sampled_from(["previous", "all_previous"])),
    }


def build(case) -> tuple[HiveVisionContext, torch.Tensor]:
    """The context of a drawn batch, and its per-image level tensor (each image's values distinct and non-zero)."""
    batch, length = len(case["columns"]), case["length"]
    markers = torch.zeros(batch, length, dtype=torch.bool)
    for b, columns in enumerate(case["columns"]):
        markers[b, columns] = True
    images = int(markers.sum())
    level = torch.arange(1, images * case["tokens"] * 2 + 1, dtype=torch.float32).view(images, case["tokens"], 2)
    usable = torch.tensor(case["usable"])
    slots = marker_slots(markers, images, image_token_id=0).without(None if bool(usable.all()) else usable)
    context = HiveVisionContext.from_images([level], None, slots, prompt_length=length, media_attention=case["mode"])
    return context, level


def expected_images(case, b: int, column: int) -> list[int]:
    """The batch-wide indices of the images sample `b`'s token at `column` may see, the plain way."""
    first = sum(len(c) for c in case["columns"][:b])
    seen = [
        (marker, first + k)
        for k, marker in enumerate(case["columns"][b])
        if marker <= min(column, case["length"]) and case["usable"][first + k]
    ]
    if case["mode"] == "previous" and seen:
        return [max(seen)[1]]  # the latest usable image whose marker precedes the token
    return [index for _, index in seen]


@SETTINGS
@given(batches(), st.integers(0, 3))
def test_a_token_sees_exactly_the_usable_images_whose_marker_precedes_it_in_its_own_sample(case, generated):
    context, level = build(case)
    length, tokens = case["length"], case["tokens"]
    positions = torch.arange(length + generated)  # generated columns past the prompt too
    visible, has_media = context.visibility(positions, level_index=0)
    slots = context.image_valid.shape[1]
    for b in range(len(case["columns"])):
        first = sum(len(c) for c in case["columns"][:b])
        for column in positions.tolist():
            wanted = expected_images(case, b, column)
            got = [first + k for k in range(slots) if bool(visible[b, column, k * tokens : (k + 1) * tokens].all())]
            partly = [k for k in range(slots) if bool(visible[b, column, k * tokens : (k + 1) * tokens].any())]
            assert got == wanted and len(partly) == len(got), (b, column, got, wanted)
    assert torch.equal(has_media, visible.any(-1))


@SETTINGS
@given(batches())
def test_padding_and_left_out_slots_are_exact_zeros_and_real_slots_hold_their_image(case):
    context, level = build(case)
    tokens = case["tokens"]
    laid_out = context.levels[0]  # (batch, slots*tokens, hidden)
    for b, columns in enumerate(case["columns"]):
        first = sum(len(c) for c in case["columns"][:b])
        for k in range(context.image_valid.shape[1]):
            block = laid_out[b, k * tokens : (k + 1) * tokens]
            if k < len(columns) and case["usable"][first + k]:
                assert torch.equal(block, level[first + k])
            else:
                assert torch.equal(block, torch.zeros_like(block))


@SETTINGS
@given(batches(), st.integers(1, 3))
def test_beams_see_what_their_prompt_sees(case, beams):
    context, _ = build(case)
    expanded = context.for_batch(context.batch_size * beams)
    positions = torch.arange(case["length"] + 1)
    visible, has_media = context.visibility(positions, 0)
    visible_beams, has_media_beams = expanded.visibility(positions, 0)
    assert torch.equal(visible_beams, visible.repeat_interleave(beams, 0))
    assert torch.equal(has_media_beams, has_media.repeat_interleave(beams, 0))
    assert torch.equal(expanded.levels[0], context.levels[0].repeat_interleave(beams, 0))


@st.composite
def grids(draw):
    images = draw(st.integers(1, 4))
    return {
        "grids": [(draw(st.integers(1, 7)), draw(st.integers(1, 7))) for _ in range(images)],
        "tokens": draw(st.sampled_from([1, 4, 9, 16])),
    }


@SETTINGS
@given(grids())
def test_levels_pool_to_one_token_count_for_every_grid_accepted(case):
    """NaFlex: each image its own grid, padded patches at the end. Every level comes out as one tensor, the real
    tokens of each image are exactly its own grid pooled alone, and the rest is masked."""
    grids, tokens = case["grids"], case["tokens"]
    longest = max(h * w for h, w in grids)
    torch.manual_seed(0)
    states = torch.randn(len(grids), longest, 3)
    patch_mask = torch.zeros(len(grids), longest, dtype=torch.bool)
    for i, (h, w) in enumerate(grids):
        patch_mask[i, : h * w] = True
    encoder = HiveLevelEncoder(
        num_levels=2, projector_type="linear", vision_hidden_size=3, output_size=3, tokens_per_level=tokens,
        keep_prefix_tokens=False, level_embedding=False,
    )  # fmt: skip
    with torch.no_grad():
        for projector in encoder.projectors:  # identity: compare pooled features directly
            projector.layers[0].weight.copy_(torch.eye(3))
            projector.layers[0].bias.zero_()
        levels, mask = encoder([states, states], grids=grids, patch_mask=patch_mask)
    assert levels[0].shape == levels[1].shape
    side = int(tokens**0.5)
    counts = [min(side, h) * min(side, w) for h, w in grids]
    real = mask if mask is not None else torch.ones(levels[0].shape[:2], dtype=torch.bool)
    assert real.sum(1).tolist() == counts
    for i, (h, w) in enumerate(grids):
        alone = pool_patch_grid(states[i : i + 1, : h * w], (h, w), tokens)[0]
        torch.testing.assert_close(levels[0][i, : counts[i]], alone)
        assert bool(real[i, : counts[i]].all()) and not bool(real[i, counts[i] :].any())
