"""HiveForConditionalGeneration over every (vision encoder, LM) pair; AutoModel registration and round trips."""

import itertools
import json

import pytest
import torch
from tiny_models import (
    IMAGE_TOKEN,
    TEXT_BUILDERS,
    VISION_BUILDERS,
    build_text,
    build_vision,
    set_gates,
    text_ids,
    vision_inputs,
)
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText

import hive_adapter as hive
from hive_adapter.model.attach import hive_call_of

PAIRS = list(itertools.product(VISION_BUILDERS, TEXT_BUILDERS))


def compose(vision="siglip", text="llama", **overrides):
    config = hive.HiveConfig(**{"vision_layers": [1, 3], "llm_layers": [0, 2], **overrides})
    return hive.HiveForConditionalGeneration.from_vision_text(build_vision(vision), build_text(text), config).eval()


@pytest.mark.parametrize("vision, text", PAIRS)
def test_identity_at_init_for_every_pair(vision, text):
    language_model = build_text(text)
    ids = text_ids(2, 12)
    with torch.no_grad():
        reference = language_model(input_ids=ids).logits
    config = hive.HiveConfig(vision_layers=[1, 3], llm_layers=[1, 3], tokens_per_level=4)
    model = hive.HiveForConditionalGeneration.from_vision_text(build_vision(vision), language_model, config).eval()
    with torch.no_grad():
        with_images = model(input_ids=ids, **vision_inputs(vision, 2)).logits
        text_only = model(input_ids=ids).logits
    torch.testing.assert_close(with_images, reference, rtol=0, atol=0)
    torch.testing.assert_close(text_only, reference, rtol=0, atol=0)
    set_gates(model, 0.5)
    with torch.no_grad():
        opened = model(input_ids=ids, **vision_inputs(vision, 2)).logits
    assert (opened - reference).abs().max() > 1e-4  # and HIVE is really wired in


def test_from_vision_text_keeps_the_given_weights():
    vision, text = build_vision("clip"), build_text("qwen2")
    vision_state = {k: v.clone() for k, v in vision.state_dict().items()}
    text_state = {k: v.clone() for k, v in text.state_dict().items()}
    model = hive.HiveForConditionalGeneration.from_vision_text(vision, text, hive.HiveConfig())
    for key, value in model.vision_model.state_dict().items():
        torch.testing.assert_close(value, vision_state[key], rtol=0, atol=0)
    text_now = model.language_model.state_dict()
    assert text_now.keys() == text_state.keys()
    for key, value in text_now.items():
        torch.testing.assert_close(value, text_state[key], rtol=0, atol=0)
    assert all(p.item() == 0 for n, p in model.named_parameters() if n.endswith("hive_attn_gate"))


@pytest.mark.parametrize("auto_class", [AutoModel, AutoModelForImageTextToText, AutoModelForCausalLM])
def test_save_and_auto_load_give_identical_outputs(tmp_path, auto_class):
    model = compose("clip", "gemma2", use_ffn=True, level_mapping="all")  # Gemma-2 ties its embeddings
    set_gates(model, 0.4)
    ids = text_ids(2, 10)
    pixels = vision_inputs("clip", 2)
    with torch.no_grad():
        expected = model(input_ids=ids, **pixels).logits
    model.save_pretrained(tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "model.safetensors" in files and "config.json" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))]
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "hive"
    assert isinstance(AutoConfig.from_pretrained(tmp_path), hive.HiveConfig)

    loaded = auto_class.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, hive.HiveForConditionalGeneration)
    with torch.no_grad():
        got = loaded(input_ids=ids, **pixels).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_a_config_alone_builds_a_random_model():
    config = hive.HiveConfig(
        vision_config=build_vision("dinov2").config, text_config=build_text("mistral").config, llm_layers=[0, 3]
    )
    model = AutoModel.from_config(config)
    assert isinstance(model, hive.HiveForConditionalGeneration)
    assert [i for i, layer in enumerate(model.language_model.model.layers) if hive_call_of(layer)] == [0, 3]
    assert all(p.item() == 0 for n, p in model.named_parameters() if n.endswith("hive_attn_gate"))


def test_bad_sub_model_pairing_is_named():
    with pytest.raises(ValueError, match="llm_layers=\\[0, 7\\]: index 7 is out of range, the language model has 4"):
        hive.HiveConfig(
            vision_config=build_vision("clip").config,
            text_config=build_text("llama").config,
            vision_layers=[1, 2],
            llm_layers=[0, 7],
        )
    with pytest.raises(ValueError, match="without an LM head"):
        hive.HiveForConditionalGeneration.from_vision_text(
            build_vision("clip"), build_text("llama").model, hive.HiveConfig()
        )


def test_exported_vision_encoder_is_a_plain_hf_model(tmp_path):
    model = compose("siglip", "llama")
    model.export_vision_model().save_pretrained(tmp_path)
    encoder = AutoModel.from_pretrained(tmp_path).eval()
    assert type(encoder).__name__ == "SiglipVisionModel"
    pixels = vision_inputs("siglip", 1)["pixel_values"]
    with torch.no_grad():
        torch.testing.assert_close(
            encoder(pixel_values=pixels).last_hidden_state, model.vision_model(pixel_values=pixels).last_hidden_state
        )


@pytest.mark.parametrize("vision, prefix", [("clip", 1), ("siglip", 0), ("dinov2", 1)])
def test_special_tokens_are_dropped_and_pooling_reaches_the_asked_count(vision, prefix):
    full_grid = compose(vision, "llama")
    levels, mask = full_grid.hive_encode_images(**vision_inputs(vision, 3))
    assert mask is None and [tuple(level.shape) for level in levels] == [(3, 16, 64)] * 2  # 4x4 patches, no CLS
    kept = compose(vision, "llama", vision_feature_select="full")
    levels, _ = kept.hive_encode_images(**vision_inputs(vision, 3))
    assert levels[0].shape[1] == 16 + prefix
    pooled = compose(vision, "llama", tokens_per_level=4)
    levels, _ = pooled.hive_encode_images(**vision_inputs(vision, 3))
    assert [tuple(level.shape) for level in levels] == [(3, 4, 64)] * 2


def test_pooling_averages_neighbouring_patches():
    from hive_adapter.model.levels import pool_patch_grid

    grid = torch.arange(16.0).view(1, 16, 1)  # a 4x4 grid, row-major
    pooled = pool_patch_grid(grid, (4, 4), 4)
    assert pooled.flatten().tolist() == [2.5, 4.5, 10.5, 12.5]  # mean of each 2x2 quadrant


def test_siglip2_padded_patches_are_never_attended():
    model = compose("siglip2", "llama", cross_attn_implementation="eager")
    set_gates(model, 0.5)
    inputs = vision_inputs("siglip2", 2)
    inputs["pixel_attention_mask"][1, 12:] = 0  # image 1 has 12 real patches (3x4 grid) and 4 padding
    inputs["spatial_shapes"][1] = torch.tensor([3, 4])
    ids = text_ids(2, 6)
    with torch.no_grad(), model.hive_runtime.recording_attention() as recorded:
        model(input_ids=ids, **inputs)
    weights = recorded[0]  # (batch, heads, text, keys)
    assert weights[1, :, :, 12:].abs().max() == 0
    assert weights[0, :, :, 12:].abs().max() > 0


def test_sdpa_and_eager_agree():
    eager = compose("clip", "llama", cross_attn_implementation="eager")
    sdpa = compose("clip", "llama", cross_attn_implementation="sdpa")
    sdpa.load_state_dict(eager.state_dict())
    set_gates(eager, 0.5)
    set_gates(sdpa, 0.5)
    ids = text_ids(2, 9, seed=5)
    pixels = vision_inputs("clip", 2)
    with torch.no_grad():
        torch.testing.assert_close(sdpa(input_ids=ids, **pixels).logits, eager(input_ids=ids, **pixels).logits)


def test_gradients_reach_each_level_in_the_full_model():
    model = compose("clip", "qwen3", vision_layers=[0, 2], llm_layers=[1, 3]).train()
    set_gates(model, 0.5)
    ids = text_ids(2, 8)
    model(input_ids=ids, **vision_inputs("clip", 2), labels=ids).loss.backward()
    layers = (
        model.vision_model.vision_model.encoder.layers
        if hasattr(model.vision_model, "vision_model")
        else model.vision_model.encoder.layers
    )
    grads = [sum(p.grad.abs().sum() for p in layer.parameters() if p.grad is not None) for layer in layers]
    assert grads[0] > 0 and grads[2] > 0  # both selected levels (and what feeds them) are reached
    assert grads[3] == 0  # the layer above the deepest selected level has no path to the loss


def test_marker_token_places_the_image_in_the_full_model():
    model = compose("clip", "llama", image_token_id=IMAGE_TOKEN)
    set_gates(model, 0.5)
    ids = text_ids(1, 10, marker_at=6)
    with torch.no_grad():
        hived = model(input_ids=ids, **vision_inputs("clip", 1)).logits
        text_only = model(input_ids=ids).logits
    torch.testing.assert_close(hived[:, :6], text_only[:, :6], rtol=0, atol=0)
    assert (hived[:, 6:] - text_only[:, 6:]).abs().max() > 1e-4
