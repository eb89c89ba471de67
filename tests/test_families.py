"""HIVE on the VLM families people train today (issue 37): every contract, per family, on tiny random models built
from each family's own config class and fed the family's own pixel format (tests/family_models.py; the session
fixtures `family_bases` / `family_wrapped` in conftest.py).

Per family: the parts are found (transformers' get_encoder / get_decoder), gates at 0 give the base's text-only
logits, gradients reach HIVE's modules only, the picture moves the logits once the gates open, a swapped picture
changes only its own sample, generate with the cache equals generate without, unload() is bit-exact, an adapter
saved and loaded computes the same, and the family processor's expanded placeholders are refused by name. Composed
models: a family's encoder + a language model, at identity and through AutoModel. How each reader reads its
family's pixels: tests/test_family_readers.py; the processors: tests/test_family_processors.py.
"""

from __future__ import annotations

import pytest
import torch
from family_models import FAMILIES, IMAGE_TOKEN, LENGTH, MARKER_AT, batch_of, marker_text, open_gates, text_only
from tiny_models import set_gates

import hive_adapter as hive

NAMES = sorted(FAMILIES)


@pytest.mark.parametrize("name", NAMES)
def test_the_parts_are_found_where_transformers_says(name, family_bases, family_wrapped):
    base, model = family_bases(name), family_wrapped(name)
    assert model.hive_vision.tower is base.get_encoder(modality="image")
    assert model._hive_attachment.layers is base.get_decoder().layers
    assert model.hive_vision.reader.name == FAMILIES[name].reader


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_gates_at_zero_give_the_base_text_only_logits(name, family_wrapped):
    batch = batch_of(name)
    got = family_wrapped(name)(**batch).logits
    want = FAMILIES[name].build()(**text_only(batch)).logits  # the same seed: the same weights, never wrapped
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_hive_modules_only(name, family_wrapped):
    model = family_wrapped(name)
    batch = batch_of(name)
    batch["labels"] = batch["input_ids"].clone()
    with open_gates(model, 0.5):
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    model.zero_grad(set_to_none=True)
    hive_names = {n for n, _ in model.hive_named_parameters()}
    assert grads, "no gradient at all"
    assert grads <= hive_names, sorted(grads - hive_names)[:5]
    assert any("projectors" in n for n in grads) and any("hive_blocks" in n for n in grads)


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_the_picture_moves_the_logits_once_gates_open_and_a_swapped_picture_changes_only_its_sample(
    name, family_wrapped
):
    model = family_wrapped(name)
    batch = batch_of(name)
    case = FAMILIES[name]
    with open_gates(model):
        with_picture = model(**batch).logits
        without = model(**text_only(batch)).logits
        # The second image replaced by another of the same size: only sample 1 may change.
        swapped = case.swap_second(batch, case.pixel_inputs(11))
        after_swap = model(**swapped).logits
    assert not torch.allclose(with_picture[:, MARKER_AT:], without[:, MARKER_AT:])
    if case.causal_prompt:  # before the marker the picture is not seen
        torch.testing.assert_close(with_picture[:, :MARKER_AT], without[:, :MARKER_AT], rtol=0, atol=0)
    torch.testing.assert_close(after_swap[0], with_picture[0], rtol=0, atol=0)
    assert not torch.allclose(after_swap[1, MARKER_AT:], with_picture[1, MARKER_AT:])


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_generate_with_the_cache_equals_generate_without(name, family_wrapped):
    model = family_wrapped(name)
    batch = batch_of(name)
    with open_gates(model):
        cached = model.generate(**batch, max_new_tokens=4, do_sample=False, use_cache=True)
        uncached = model.generate(**batch, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    assert cached.shape == (2, LENGTH + 4)


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_unload_gives_back_the_base_bit_exact(name):
    base = FAMILIES[name].build(seed=3)
    batch = text_only(batch_of(name))
    before = base(**batch).logits
    state = {k: v.clone() for k, v in base.state_dict().items()}
    flags = {n: p.requires_grad for n, p in base.named_parameters()}
    model = hive.get_hive_model(base, hive.HiveConfig(vision_layers=[1, 3]))
    set_gates(model, 1.0)
    model(**batch_of(name))
    again = model.unload()
    assert again is base
    assert {n: p.requires_grad for n, p in again.named_parameters()} == flags
    assert again.state_dict().keys() == state.keys()
    assert all(torch.equal(again.state_dict()[k], v) for k, v in state.items())
    assert torch.equal(again(**batch).logits, before)


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_an_adapter_saved_and_loaded_computes_the_same(name, family_wrapped, tmp_path):
    model = family_wrapped(name)
    batch = batch_of(name)
    with open_gates(model, 0.7):
        want = model(**batch).logits
        model.save_pretrained(tmp_path)
    loaded = hive.HiveModel.from_pretrained(FAMILIES[name].build(), tmp_path)
    torch.testing.assert_close(loaded(**batch).logits, want, rtol=0, atol=0)
    loaded.unload()


@pytest.mark.parametrize("name", NAMES)
def test_the_family_processors_expanded_placeholders_are_refused_by_name(name, family_wrapped):
    model = family_wrapped(name)
    batch = batch_of(name)
    expanded = batch["input_ids"].clone()
    expanded[:, MARKER_AT : MARKER_AT + 4] = IMAGE_TOKEN  # a run of placeholders per image, as the family writes
    with pytest.raises(ValueError, match=r"run.*HiveProcessor\.from_processor"):
        model(**dict(batch, input_ids=expanded))


@pytest.mark.parametrize("name", [name for name in NAMES if FAMILIES[name].reader == "qwen-packed-patches"])
def test_pixels_without_their_grid_are_refused_naming_it(name, family_wrapped):
    model = family_wrapped(name)
    batch = batch_of(name)
    with pytest.raises(ValueError, match="image_grid_thw"):
        model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"])


COMPOSED = ["qwen2_5_vl", "qwen3_vl", "mistral3", "gemma4", "internvl", "smolvlm"]


@pytest.mark.parametrize("name", COMPOSED)
@torch.no_grad()
def test_a_family_encoder_composes_with_a_language_model_and_round_trips_through_auto_model(
    name, family_bases, tmp_path
):
    """HiveForConditionalGeneration.from_vision_text takes Qwen's ViT, Pixtral, Gemma 4's encoder, InternViT and
    SmolVLM's encoder: gates at 0 give the language model's own logits, and AutoModelForImageTextToText loads the
    saved model computing the same."""
    from tiny_models import VOCAB as TINY_VOCAB
    from tiny_models import build_text
    from transformers import AutoModelForImageTextToText

    tower = FAMILIES[name].build(seed=4).get_encoder(modality="image")
    language = build_text("llama")
    model = hive.HiveForConditionalGeneration.from_vision_text(tower, language, hive.HiveConfig(image_token_id=95))
    model.eval()
    batch = {"input_ids": marker_text(2, LENGTH, marker_at=MARKER_AT), **FAMILIES[name].pixel_inputs(5)}
    assert int(batch["input_ids"].max()) < TINY_VOCAB
    assert model.hive_vision.reader.name == FAMILIES[name].reader
    plain = build_text("llama")(input_ids=batch["input_ids"]).logits  # the same seed: the same weights, never hooked
    torch.testing.assert_close(model(**batch).logits, plain, rtol=0, atol=0)
    set_gates(model, 0.5)
    want = model(**batch).logits
    model.save_pretrained(tmp_path)
    again = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(again) is hive.HiveForConditionalGeneration
    torch.testing.assert_close(again(**batch).logits, want, rtol=0, atol=0)


CONCAT_REFUSED = ("gemma3", "paligemma", "gemma4")  # their generate takes no inputs_embeds


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("connector", ["cascaded", "concat"])
def test_the_baseline_connectors_train_and_generate_on_a_family_or_are_refused_at_wrap(name, connector):
    """The paper's comparison on the model people use: the cascaded and concat baselines run a training step and
    generate on each family; where concat cannot drive the family's base, get_hive_model refuses it naming why."""
    config = hive.HiveConfig(connector=connector, vision_layers=[1, 3])
    if connector == "concat" and name in CONCAT_REFUSED:
        with pytest.raises(ValueError, match="concat' cannot drive .*: its generate takes no inputs_embeds"):
            hive.get_hive_model(FAMILIES[name].build(), config)
        return
    model = hive.get_hive_model(FAMILIES[name].build(), config)
    batch = batch_of(name)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    assert all(p.grad is not None for n, p in model.hive_named_parameters() if "level_embedding" not in n)
    assert model.generate(**batch, max_new_tokens=2, do_sample=False).shape == (2, LENGTH + 2)
