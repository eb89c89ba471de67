"""Connectors are classes in one registry (issue 26): a new one plugs in with one class and one call, and the
built-in ones keep their names, mappings and data flows."""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny_models import IMAGE_TOKEN, build_text, build_vision, set_gates, text_ids, vision_inputs

import hive_adapter as hive
from hive_adapter.model.connectors import (
    CrossAttentionConnector,
    connector_for,
    connector_names,
    register_connector,
)
from hive_adapter.model.layer_choice import ResolvedLayers


class ShallowestConnector(CrossAttentionConnector):
    """A toy connector: HIVE's cross-attention depths, every one fed the *shallowest* selected level (the mirror
    of the cascaded baseline). One class, one `register_connector` call: nothing else in the library changes."""

    name = "toy_shallowest"

    def pairs_levels(self, config) -> bool:
        return False

    def level_embedding(self, config) -> bool:
        return False

    def resolve_layers(self, config, *, num_vision_layers: int, num_llm_layers: int) -> ResolvedLayers:
        levels = self.vision_levels(config, num_vision_layers)
        depths = self.llm_depths(config, levels, num_llm_layers)
        return ResolvedLayers((levels[0],), tuple(depths), (0,) * len(depths))


register_connector(ShallowestConnector)


def compose(connector: str, **overrides):
    settings = {"vision_layers": [1, 3], "llm_layers": [0, 2], "image_token_id": IMAGE_TOKEN, **overrides}
    config = hive.HiveConfig(connector=connector, **settings)
    return hive.HiveForConditionalGeneration.from_vision_text(build_vision("clip"), build_text("llama"), config)


def test_the_built_in_connectors_are_registered_and_resolve_as_before():
    assert {"hive", "cascaded", "concat"} <= set(connector_names())
    config = hive.HiveConfig(vision_layers=[1, 3], llm_layers=[0, 2])
    counts = dict(num_vision_layers=4, num_llm_layers=4)
    assert config.resolve_layers(**counts) == ResolvedLayers((1, 3), (0, 2), (0, 1))
    config.connector = "cascaded"
    assert config.resolve_layers(**counts) == ResolvedLayers((3,), (0, 2), (0, 0))
    config.connector = "concat"
    assert config.resolve_layers(**counts) == ResolvedLayers((3,), (), ())
    assert not connector_for("concat").uses_cross_attention and connector_for("cascaded").uses_cross_attention


def test_a_toy_connector_plugs_in_with_one_class_and_one_registration(tmp_path):
    model = compose("toy_shallowest")
    assert model.hive_layers == ResolvedLayers((1,), (0, 2), (0, 0))
    assert len(model.hive_levels.projectors) == 1
    ids = text_ids(2, 8, marker_at=2)
    pixels = vision_inputs("clip", 2)["pixel_values"]
    model.eval()
    with torch.no_grad():
        plain = build_text("llama").eval()(input_ids=ids).logits
        torch.testing.assert_close(model(input_ids=ids, pixel_values=pixels).logits, plain, rtol=0, atol=0)
        set_gates(model, 0.5)
        opened = model(input_ids=ids, pixel_values=pixels).logits
        generated = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=3, do_sample=False)
    assert (opened[:, 2:] - plain[:, 2:]).abs().max() > 1e-3  # the image arrives, after its marker only
    torch.testing.assert_close(opened[:, :2], plain[:, :2], rtol=0, atol=0)
    assert generated.shape == (2, 11)
    model.save_pretrained(tmp_path / "toy")  # its name travels in config.json and loads back
    again = hive.HiveForConditionalGeneration.from_pretrained(tmp_path / "toy").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids, pixel_values=pixels).logits, opened)


def test_an_unknown_or_duplicate_connector_is_named():
    with pytest.raises(ValueError, match=r"connector='perceiver': expected one of 'hive', 'cascaded', 'concat'"):
        hive.HiveConfig(connector="perceiver")

    class Another(CrossAttentionConnector):
        name = "hive"

    with pytest.raises(ValueError, match=r"a connector named 'hive' is registered already"):
        register_connector(Another)
    with pytest.raises(TypeError, match="expected a subclass"):
        register_connector(object)


# ---------------------------------------------------------------------- deepstack (Qwen3-VL's DeepStack)
def deepstack_and_its_concat(vision_layers=(1, 3)):
    """A deepstack model and the concat model with the same language model, tower and deepest projector."""
    torch.manual_seed(0)
    deep = compose("deepstack", tokens_per_level=4, vision_layers=list(vision_layers)).eval()
    concat = compose("concat", tokens_per_level=4, vision_layers=[vision_layers[-1]]).eval()
    deepest = f"hive_levels.projectors.{len(vision_layers) - 1}."
    weights = {
        name.replace(deepest, "hive_levels.projectors.0."): tensor
        for name, tensor in deep.state_dict().items()
        if not name.startswith("hive_levels.projectors.") or name.startswith(deepest)
    }
    concat.load_state_dict(weights, strict=True)
    return deep, concat


def test_deepstack_resolves_every_level_and_builds_one_projector_each_and_no_cross_attention():
    config = hive.HiveConfig(vision_layers=[1, 2, 3], llm_layers=[0, 2], connector="deepstack")
    assert config.resolve_layers(num_vision_layers=4, num_llm_layers=4) == ResolvedLayers((1, 2, 3), (), ())
    with pytest.raises(ValueError, match=r"adds the 3 levels before the deepest to as many first decoder layers"):
        hive.HiveConfig(vision_layers=[0, 1, 2, 3], connector="deepstack").resolve_layers(
            num_vision_layers=4, num_llm_layers=2
        )
    with pytest.raises(ValueError, match="projector_type='lean' with connector='deepstack'"):
        hive.HiveConfig(connector="deepstack", projector_type="lean")
    deep, _ = deepstack_and_its_concat()
    assert len(deep.hive_levels.projectors) == 2 and len(deep.hive_blocks) == 0
    assert not connector_for("deepstack").uses_cross_attention


def test_deepstack_adds_the_shallower_level_after_the_first_decoder_layer_at_the_image_tokens_only():
    """Against concat with the same weights: the hidden states after decoder layer 0 differ exactly at the image
    tokens' columns (the marker at column 2 became 4 image tokens, columns 2-5); later layers carry it on."""
    deep, concat = deepstack_and_its_concat()
    ids, pixels = text_ids(2, 8, marker_at=2), vision_inputs("clip", 2)["pixel_values"]
    with torch.no_grad():
        ours = deep(input_ids=ids, pixel_values=pixels, output_hidden_states=True)
        theirs = concat(input_ids=ids, pixel_values=pixels, output_hidden_states=True)
    assert ours.logits.shape == theirs.logits.shape == (2, 11, deep.config.text_config.vocab_size)
    changed = [(a - b).abs().amax(-1) > 0 for a, b in zip(ours.hidden_states, theirs.hidden_states, strict=True)]
    assert not changed[0].any()  # the spliced input embeddings are concat's
    assert changed[1].nonzero()[:, 1].unique().tolist() == [2, 3, 4, 5]  # after layer 0: the image tokens only
    assert not changed[-1][:, :2].any() and changed[-1][:, 2:].all()  # text before the image never sees it


def test_deepstack_with_its_shallower_projector_at_zero_or_one_level_is_concat_exactly():
    deep, concat = deepstack_and_its_concat()
    ids, pixels = text_ids(2, 8, marker_at=2), vision_inputs("clip", 2)["pixel_values"]
    with torch.no_grad():
        deep.hive_levels.projectors[0].layers[-1].weight.zero_()
        deep.hive_levels.projectors[0].layers[-1].bias.zero_()
        torch.testing.assert_close(deep(input_ids=ids, pixel_values=pixels).logits,
                                   concat(input_ids=ids, pixel_values=pixels).logits, rtol=0, atol=0)  # fmt: skip
    one, concat = deepstack_and_its_concat(vision_layers=(3,))
    settings = dict(input_ids=ids, pixel_values=pixels, max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        torch.testing.assert_close(one(input_ids=ids, pixel_values=pixels).logits,
                                   concat(input_ids=ids, pixel_values=pixels).logits, rtol=0, atol=0)  # fmt: skip
    assert torch.equal(one.generate(**settings), concat.generate(**settings))


def _deepstack_gradients(checkpointing: bool | None) -> dict[str, torch.Tensor]:
    deep, _ = deepstack_and_its_concat()
    deep.train()
    if checkpointing is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the method's deprecation notice
            deep.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
    ids = text_ids(2, 8, marker_at=2)
    deep(input_ids=ids, pixel_values=vision_inputs("clip", 2)["pixel_values"], labels=ids).loss.backward()
    return {name: p.grad for name, p in deep.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("reentrant", [True, False])
def test_deepstack_trains_every_projector_and_gradient_checkpointing_keeps_its_gradients(reentrant):
    plain = _deepstack_gradients(None)
    assert all(plain[f"hive_levels.projectors.{k}.layers.0.weight"].abs().sum() > 0 for k in (0, 1))
    checkpointed = _deepstack_gradients(reentrant)
    assert checkpointed.keys() == plain.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, msg=name)


def test_deepstack_saves_loads_and_generates_the_same_with_and_without_the_cache(tmp_path):
    deep, _ = deepstack_and_its_concat()
    ids, pixels = text_ids(2, 8, marker_at=2), vision_inputs("clip", 2)["pixel_values"]
    deep.save_pretrained(tmp_path / "deepstack")
    again = hive.HiveForConditionalGeneration.from_pretrained(tmp_path / "deepstack").eval()
    assert again.hive_config.connector == "deepstack"
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids, pixel_values=pixels).logits,
                                   deep(input_ids=ids, pixel_values=pixels).logits, rtol=0, atol=0)  # fmt: skip
    settings = dict(input_ids=ids, pixel_values=pixels, max_new_tokens=4, do_sample=False)
    cached = again.generate(**settings)
    assert torch.equal(cached, again.generate(**settings, use_cache=False))
    with torch.no_grad():  # the first new token is the forward's greedy choice at the prompt's end
        assert torch.equal(cached[:, 8], again(input_ids=ids, pixel_values=pixels).logits[:, -1].argmax(-1))
