"""Connectors are classes in one registry (issue 26): a new one plugs in with one class and one call, and the
built-in ones keep their names, mappings and data flows."""

from __future__ import annotations

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
    config = hive.HiveConfig(
        vision_layers=[1, 3], llm_layers=[0, 2], connector=connector, image_token_id=IMAGE_TOKEN, **overrides
    )
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
