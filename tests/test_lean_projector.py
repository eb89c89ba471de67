"""The lean projector: one layer to the narrow width the cross-attention's K/V read (no LLM-width detour)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build_llava, build_text, build_vision, set_gates, text_ids, vision_inputs

import hive_adapter as hive
from hive_adapter.training.hive_flags import HiveArguments, hive_config_from


def lean(**overrides) -> hive.HiveForConditionalGeneration:
    config = hive.HiveConfig(**{"vision_layers": [1, 3], "llm_layers": [0, 2], "projector_type": "lean", **overrides})
    return hive.HiveForConditionalGeneration.from_vision_text(build_vision("siglip"), build_text("llama"), config)


def test_the_lean_projector_ends_at_the_narrow_width_and_starts_as_the_identity():
    model = lean().eval()
    projector = model.hive_levels.projectors[0].layers
    kv_width = 2 * 16  # the tiny Llama: 2 K/V heads of 16
    assert [type(layer).__name__ for layer in projector] == ["Linear", "GELU"]
    assert projector[0].out_features == min(32, 2 * kv_width)  # min(vision width, K and V together)
    block = model.hive_blocks["0"]
    assert block.attn.hive_k_proj.in_features == projector[0].out_features == block.hive_media_norm.weight.numel()
    ids = text_ids(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids, **vision_inputs("siglip", 2)).logits,
            build_text("llama").eval()(input_ids=ids).logits,
            rtol=0,
            atol=0,
        )


def test_the_lean_projector_trains_end_to_end_and_round_trips(tmp_path):
    model = lean(media_width=24, level_mapping="all", llm_layers=[0, 1, 2, 3])
    set_gates(model, 0.5)
    model.train()
    ids = text_ids(2, 9)
    model(input_ids=ids, **vision_inputs("siglip", 2), labels=ids).loss.backward()
    assert model.hive_levels.projectors[0].layers[0].weight.grad.abs().sum() > 0
    assert model.vision_model.encoder.layers[1].mlp.fc1.weight.grad.abs().sum() > 0  # the LM loss reaches level 1
    model.save_pretrained(tmp_path)
    again = hive.HiveForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert again.config.projector_type == "lean" and again.config.media_width == 24
    with torch.no_grad():
        torch.testing.assert_close(
            again(input_ids=ids, **vision_inputs("siglip", 2)).logits,
            model.eval()(input_ids=ids, **vision_inputs("siglip", 2)).logits,
        )


def test_the_lean_projector_works_as_an_adapter_too():
    model = hive.get_hive_model(
        build_llava(), hive.HiveConfig(vision_layers=[1, 3], llm_layers=[0, 2], projector_type="lean")
    )
    ids = text_ids(2, 10, marker_at=3)
    assert model(input_ids=ids, **vision_inputs("clip", 2)).logits.shape == (2, 10, 96)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(projector_type="lean", connector="concat"), "concat splices the projected tokens"),
        (dict(media_width=128), "media_width=128: only projector_type='lean'"),
        (dict(projector_type="lean", media_width=0), "media_width=0: expected a positive int"),
    ],
)
def test_lean_settings_that_cannot_work_are_named(settings, message):
    with pytest.raises(ValueError, match=message):
        hive.HiveConfig(**settings)


def test_the_command_line_reaches_the_lean_projector():
    config = hive_config_from(HiveArguments(hive_projector_type="lean", hive_media_width=64))
    assert (config.projector_type, config.media_width) == ("lean", 64)
    assert config.adapter_dict()["media_width"] == 64  # saved with adapters and LLaVA settings
