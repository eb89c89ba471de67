"""Unit and property tests of `hive_adapter.model.cross_attention`: the gated block on its own, over random
batches, visibility masks, gates and kernels (docs/ARCHITECTURE.md §7.2-7.3)."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hive_adapter.model.cross_attention import HiveCrossAttention, HiveCrossAttentionBlock

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HIDDEN, MEDIA = 16, 12


def block(implementation: str, gate: float, use_ffn: bool) -> HiveCrossAttentionBlock:
    torch.manual_seed(0)
    attention = HiveCrossAttention(
        hidden_size=HIDDEN, num_heads=4, num_kv_heads=2, head_dim=4, media_size=MEDIA, implementation=implementation
    )
    made = HiveCrossAttentionBlock(attention, use_ffn=use_ffn, gate_init=gate)
    return made.eval()


@st.composite
def cases(draw):
    batch, text, keys = draw(st.integers(1, 3)), draw(st.integers(1, 6)), draw(st.integers(1, 8))
    visible = torch.tensor(draw(st.lists(st.booleans(), min_size=batch * text * keys, max_size=batch * text * keys)))
    return {
        "visible": visible.view(batch, text, keys),
        "seed": draw(st.integers(0, 2**16)),
        "gate": draw(st.sampled_from([0.0, 0.5, -2.0])),
        "ffn": draw(st.booleans()),
        "kernel": draw(st.sampled_from(["sdpa", "eager"])),
    }


def inputs(case):
    visible = case["visible"]
    batch, text, keys = visible.shape
    generator = torch.Generator().manual_seed(case["seed"])
    hidden = torch.randn(batch, text, HIDDEN, generator=generator)
    media = torch.randn(batch, keys, MEDIA, generator=generator)
    return hidden, media, visible, visible.any(-1)


@SETTINGS
@given(cases())
def test_a_token_that_sees_no_image_gets_exactly_its_hidden_state_back(case):
    hidden, media, visible, has_media = inputs(case)
    # A row that sees nothing attends everywhere (no empty softmax), even to NaN keys: its update is selected away,
    # not multiplied by 0 (0 x NaN is NaN).
    media[~visible.any(1)] = float("nan")
    with torch.no_grad():
        out, _, _ = block(case["kernel"], case["gate"], case["ffn"])(hidden, media, visible, has_media)
    assert torch.equal(out[~has_media], hidden[~has_media])


@SETTINGS
@given(cases())
def test_keys_a_token_cannot_see_do_not_change_it(case):
    hidden, media, visible, has_media = inputs(case)
    other = media.clone()
    unseen = ~visible  # (batch, text, keys): change each key that a given row cannot see, row by row
    made = block(case["kernel"], 0.5 if case["gate"] == 0.0 else case["gate"], case["ffn"])
    with torch.no_grad():
        out, _, _ = made(hidden, media, visible, has_media)
        for b in range(visible.shape[0]):
            for t in range(visible.shape[1]):
                changed = other.clone()
                changed[b, unseen[b, t]] = torch.randn(int(unseen[b, t].sum()), MEDIA)
                again, _, _ = made(hidden, changed, visible, has_media)
                torch.testing.assert_close(again[b, t], out[b, t])


@SETTINGS
@given(cases())
def test_cached_key_values_give_the_same_output_and_a_zero_gate_is_the_identity(case):
    hidden, media, visible, has_media = inputs(case)
    made = block(case["kernel"], case["gate"], case["ffn"])
    with torch.no_grad():
        out, _, key_value = made(hidden, media, visible, has_media, return_key_value=True)
        cached, _, _ = made(hidden, None, visible, has_media, key_value=key_value)
    assert torch.equal(cached, out)
    if case["gate"] == 0.0:
        assert torch.equal(out, hidden)
    else:
        assert not torch.equal(out[has_media], hidden[has_media]) or not bool(has_media.any())


def test_eager_and_sdpa_agree_and_eager_weights_cover_only_visible_keys():
    case = {"visible": torch.rand(2, 5, 7, generator=torch.Generator().manual_seed(0)) > 0.5, "seed": 1}
    hidden, media, visible, has_media = inputs(case)
    with torch.no_grad():
        sdpa, _, _ = block("sdpa", 0.7, True)(hidden, media, visible, has_media)
        eager, weights, _ = block("eager", 0.7, True)(hidden, media, visible, has_media, return_weights=True)
    torch.testing.assert_close(eager, sdpa)
    assert bool((weights.masked_select(~visible[:, None].expand_as(weights)) == 0).all())
    sums = weights.sum(-1)  # (batch, heads, text): 1 where the token sees an image, 0 where it sees none
    torch.testing.assert_close(sums, has_media[:, None].expand_as(sums).float())
