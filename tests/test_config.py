"""HiveConfig: defaults, layer resolution and every bad value named in its error."""

import pytest
import torch
from tiny_models import build_llava

import hive_adapter as hive
from hive_adapter.model.config import spread_layers


def test_defaults_pick_a_quarter_of_vision_layers_spread_shallow_to_deep():
    resolved = hive.HiveConfig().resolve_layers(num_vision_layers=24, num_llm_layers=22)
    assert resolved.vision_layers == (3, 7, 11, 15, 19, 23)  # 25% of 24, ends at the last layer
    assert resolved.llm_layers == (0, 3, 7, 11, 14, 18)  # as many depths, from layer 0, evenly
    assert resolved.level_of_block == (0, 1, 2, 3, 4, 5)  # paired shallow->shallow


def test_negative_indices_and_pairing():
    resolved = hive.HiveConfig(vision_layers=[1, -1], llm_layers=[0, -1]).resolve_layers(
        num_vision_layers=8, num_llm_layers=6
    )
    assert resolved.vision_layers == (1, 7)
    assert resolved.llm_layers == (0, 5)


def test_llm_layers_alone_set_the_level_count():
    resolved = hive.HiveConfig(llm_layers=[0, 1, 2]).resolve_layers(num_vision_layers=12, num_llm_layers=4)
    assert resolved.vision_layers == tuple(spread_layers(3, 12, end_at_last=True)) == (3, 7, 11)


def test_all_mapping_lets_every_depth_see_every_level():
    resolved = hive.HiveConfig(vision_layers=[1, 2, 3], llm_layers=[0, 3], level_mapping="all").resolve_layers(
        num_vision_layers=4, num_llm_layers=4
    )
    assert resolved.level_of_block == (None, None)


def test_cascaded_feeds_every_depth_from_the_deepest_level():
    resolved = hive.HiveConfig(
        vision_layers=[0, 1, 2, 3], llm_layers=[0, 1, 2, 3], connector="cascaded"
    ).resolve_layers(num_vision_layers=4, num_llm_layers=4)
    assert resolved.vision_layers == (3,)
    assert resolved.llm_layers == (0, 1, 2, 3)
    assert resolved.level_of_block == (0, 0, 0, 0)


def test_concat_wraps_no_layer():
    resolved = hive.HiveConfig(connector="concat").resolve_layers(num_vision_layers=8, num_llm_layers=8)
    assert resolved.vision_layers == (7,) and resolved.llm_layers == ()


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(vision_layers=[1, 2], llm_layers=[0]), "vision_layers=[1, 2] and llm_layers=[0]"),
        (dict(tokens_per_level=10), "tokens_per_level=10"),
        (dict(tokens_per_level=0), "tokens_per_level=0"),
        (dict(projector_type="mlp3x"), "projector_type='mlp3x'"),
        (dict(connector="perceiver"), "connector='perceiver'"),
        (dict(level_mapping="some"), "level_mapping='some'"),
        (dict(placement="inside"), "placement='inside'"),
        (dict(media_attention="next"), "media_attention='next'"),
        (dict(cross_attn_implementation="xformers"), "cross_attn_implementation='xformers'"),
        (dict(num_attention_heads=4, num_key_value_heads=3), "num_key_value_heads=3"),
        (dict(vision_layers=[]), "vision_layers=[]"),
        (dict(vision_layers=[1.5]), "vision_layers=[1.5]"),
        (dict(tokens_per_level=4, vision_feature_select="full"), "tokens_per_level=4"),
    ],
)
def test_bad_values_are_named_at_construction(kwargs, fragment):
    with pytest.raises(ValueError) as error:
        hive.HiveConfig(**kwargs)
    assert fragment in str(error.value)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (
            dict(vision_layers=[1, 9], llm_layers=[0, 1]),
            "vision_layers=[1, 9]: index 9 is out of range, the vision encoder has 4",
        ),
        (
            dict(vision_layers=[1, 2], llm_layers=[0, 40]),
            "llm_layers=[0, 40]: index 40 is out of range, the language model has 4",
        ),
        (dict(vision_layers=[2, 1], llm_layers=[0, 1]), "ascending"),
        (dict(vision_layers=[3, -1], llm_layers=[0, 1]), "the same layer is listed twice"),
        (dict(layers_path="model.nothing"), "layers_path='model.nothing'"),
    ],
)
def test_bad_layer_choices_are_named_when_the_model_is_wrapped(kwargs, fragment):
    with pytest.raises(ValueError) as error:
        hive.get_hive_model(build_llava(), hive.HiveConfig(**kwargs))
    assert fragment in str(error.value)


def test_a_model_without_known_layers_gets_told_what_to_pass():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2)])

    from hive_adapter.model.architectures import find_decoder_layers

    with pytest.raises(ValueError, match="Pass HiveConfig\\(layers_path="):
        find_decoder_layers(Odd())
    path, layers = find_decoder_layers(Odd(), "blocks")
    assert path == "blocks" and len(layers) == 1


def test_config_round_trips_through_json(tmp_path):
    config = hive.HiveConfig(vision_layers=[1, 3], llm_layers=[0, 2], tokens_per_level=4, use_ffn=True)
    config.save_pretrained(tmp_path)
    again = hive.HiveConfig.from_pretrained(tmp_path)
    assert again.adapter_dict() == config.adapter_dict()
