"""Interleaved images: which text token sees which image (the Idefics/Mllama leak, tested both ways)."""

import pytest
import torch
from tiny_models import IMAGE_TOKEN, build_text, build_vision, set_gates, text_ids, vision_inputs

import hive_adapter as hive

TOKENS = 4  # pooled tokens per image


def model_for(media_attention="previous", use_ffn=True, implementation="eager"):
    config = hive.HiveConfig(
        vision_layers=[1, 3],
        llm_layers=[0, 2],
        image_token_id=IMAGE_TOKEN,
        tokens_per_level=TOKENS,
        use_ffn=use_ffn,
        media_attention=media_attention,
        cross_attn_implementation=implementation,
    )
    model = hive.HiveForConditionalGeneration.from_vision_text(build_vision("clip"), build_text("llama"), config)
    set_gates(model, 0.8)
    return model.eval()


def attention_maps(model, ids, pixel_values):
    with torch.no_grad(), model.hive_runtime.recording_attention() as recorded:
        model(input_ids=ids, pixel_values=pixel_values)
    return recorded  # block -> (batch, heads, text, images*tokens)


def two_images(length=12, first=3, second=8):
    ids = text_ids(1, length)
    ids[0, first] = ids[0, second] = IMAGE_TOKEN
    return ids


@pytest.mark.parametrize("media_attention", ["previous", "all_previous"])
def test_text_before_the_first_image_gets_exactly_zero(media_attention):
    model = model_for(media_attention)
    ids = two_images()
    with torch.no_grad():
        with_images = model(input_ids=ids, **vision_inputs("clip", 2)).logits
        text_only = model(input_ids=ids).logits
    torch.testing.assert_close(with_images[:, :3], text_only[:, :3], rtol=0, atol=0)  # attention and FFN alike
    assert (with_images[:, 3:] - text_only[:, 3:]).abs().amax(-1).min() > 1e-5  # every later token is affected


def test_previous_mode_sees_only_the_latest_image():
    maps = attention_maps(model_for("previous"), two_images(), vision_inputs("clip", 2)["pixel_values"])
    for weights in maps.values():
        first, second = weights[0, :, :, :TOKENS], weights[0, :, :, TOKENS:]
        assert first[:, 3:8].sum(-1).allclose(torch.ones(1))  # tokens 3..7 attend to image 1 only
        assert second[:, 3:8].abs().max() == 0
        assert first[:, 8:].abs().max() == 0  # from the second marker on: image 2 only
        assert second[:, 8:].sum(-1).allclose(torch.ones(1))


def test_all_previous_mode_sees_every_earlier_image():
    maps = attention_maps(model_for("all_previous"), two_images(), vision_inputs("clip", 2)["pixel_values"])
    for weights in maps.values():
        first, second = weights[0, :, :, :TOKENS], weights[0, :, :, TOKENS:]
        assert second[:, 3:8].abs().max() == 0  # image 2 stays invisible before its marker
        assert (first[:, 8:].sum(-1) > 0).all() and (second[:, 8:].sum(-1) > 0).all()


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_a_batch_mixing_zero_one_and_two_images_equals_each_sample_alone(implementation):
    model = model_for("previous", implementation=implementation)
    none = text_ids(1, 12, seed=11)
    one = text_ids(1, 12, marker_at=5, seed=12)
    two = two_images()
    batch = torch.cat([none, one, two])
    pixels = vision_inputs("clip", 3)["pixel_values"]  # in marker order: sample 1's, then sample 2's two
    with torch.no_grad():
        together = model(input_ids=batch, pixel_values=pixels).logits
        alone = [
            model(input_ids=none).logits,
            model(input_ids=one, pixel_values=pixels[:1]).logits,
            model(input_ids=two, pixel_values=pixels[1:]).logits,
        ]
    for row, expected in enumerate(alone):
        torch.testing.assert_close(together[row : row + 1], expected, atol=1e-5, rtol=1e-5)


def test_images_follow_marker_order_across_the_batch():
    """Swapping the two images of a sample changes what later text sees (they are not pooled together)."""
    model = model_for("previous")
    ids = two_images()
    pixels = vision_inputs("clip", 2)["pixel_values"]
    with torch.no_grad():
        forward = model(input_ids=ids, pixel_values=pixels).logits
        swapped = model(input_ids=ids, pixel_values=pixels.flip(0)).logits
    assert (forward[:, 3:] - swapped[:, 3:]).abs().max() > 1e-5
    torch.testing.assert_close(forward[:, :3], swapped[:, :3], rtol=0, atol=0)


def test_text_only_batches_run_every_hive_module():
    """ZeRO-3/FSDP hang if a rank skips parameters: every HIVE parameter gets a (zero) gradient."""
    model = model_for(use_ffn=True).train()
    ids = text_ids(2, 10)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    for name, param in model.hive_named_parameters():
        assert param.grad is not None, name
        assert param.grad.abs().max() == 0, name  # the dummy image contributes exactly nothing
    model.zero_grad()
    hive.mark_hive_trainable(model, False)
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    set_gates(model, 0.0)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference, rtol=0, atol=0)


@pytest.mark.parametrize(
    "markers, images, fragment",
    [
        ((3,), 2, "1 image marker tokens .* 2 images"),
        ((3, 8), 1, "2 image marker tokens .* 1 images"),
    ],
)
def test_marker_and_image_counts_must_agree(markers, images, fragment):
    model = model_for()
    ids = text_ids(1, 12)
    for position in markers:
        ids[0, position] = IMAGE_TOKEN
    with pytest.raises(ValueError, match=fragment):
        model(input_ids=ids, **vision_inputs("clip", images))
