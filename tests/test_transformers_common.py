"""transformers' own `ModelTesterMixin` and `ConfigTester` run against `HiveForConditionalGeneration`.

The two test files come from the source distribution of the installed transformers version
(tests/transformers_suite.py downloads and caches them; nothing of them is in this repository). Three
configurations, each with gates opened (`gate_init=0.5`) so that HIVE changes the outputs and gets
gradients:

- `siglip_marker`: tiny SigLIP + Llama, one `<image>` marker per sample at a different column in each row;
- `clip_marker`: the same with a CLIP tower (a CLS token in front of the patch grid);
- `captioning_ffn_all_after`: no marker (every token sees its sample's image), gated FFNs,
  `level_mapping="all"`, blocks placed after their decoder layer.

Every test the mixin runs either passes or is skipped below with its reason.
"""

from __future__ import annotations

import json
import sys
import unittest

import pytest
import torch
from transformers_suite import ensure_transformers_tests

import hive_adapter  # noqa: F401  (registers model_type "hive")
from hive_adapter import HiveConfig, HiveForConditionalGeneration

sys.path.insert(0, str(ensure_transformers_tests()))
from transformers_tests.test_configuration_common import ConfigTester  # noqa: E402
from transformers_tests.test_modeling_common import ModelTesterMixin, floats_tensor, ids_tensor  # noqa: E402

IMAGE_TOKEN = 4  # low, so that shrinking the vocabulary (test_resize_tokens_embeddings) keeps it
VOCAB = 99

TEXT_CONFIG = {
    "model_type": "llama",
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "pad_token_id": 1,
    "bos_token_id": 2,
    "eos_token_id": 3,
}
VISION_COMMON = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 16,
    "patch_size": 4,
}

CONFIGURATIONS = {
    "siglip_marker": {
        "vision_config": {"model_type": "siglip_vision_model", **VISION_COMMON},
        "hive": {"image_token_id": IMAGE_TOKEN},
    },
    "clip_marker": {
        "vision_config": {"model_type": "clip_vision_model", **VISION_COMMON},
        "hive": {"image_token_id": IMAGE_TOKEN},
    },
    "captioning_ffn_all_after": {
        "vision_config": {"model_type": "siglip_vision_model", **VISION_COMMON},
        "hive": {"image_token_id": None, "use_ffn": True, "level_mapping": "all", "placement": "after"},
    },
}


class HiveModelTester:
    """Configs and inputs in the shape `ModelTesterMixin` expects."""

    def __init__(self, parent, configuration: str):
        self.parent = parent
        self.configuration = configuration
        spec = CONFIGURATIONS[configuration]
        self.text_config = dict(TEXT_CONFIG)
        self.vision_config = dict(spec["vision_config"])
        self.hive = dict(spec["hive"])
        self.batch_size = 3
        self.seq_length = 7
        self.is_training = True
        self.vocab_size = VOCAB
        self.hidden_size = TEXT_CONFIG["hidden_size"]
        self.num_hidden_layers = TEXT_CONFIG["num_hidden_layers"]
        self.num_attention_heads = TEXT_CONFIG["num_attention_heads"]
        self.pad_token_id = TEXT_CONFIG["pad_token_id"]
        self.image_token_id = self.hive["image_token_id"]

    def get_config(self) -> HiveConfig:
        return HiveConfig(
            vision_layers=[0, 1],
            llm_layers=[0, 1],
            gate_init=0.5,  # HIVE changes the outputs from the start, so every test sees it
            vision_config=dict(self.vision_config),
            text_config=dict(self.text_config),
            **self.hive,
        )

    def prepare_config_and_inputs_for_common(self):
        config = self.get_config()
        input_ids = ids_tensor([self.batch_size, self.seq_length], VOCAB - 5) + 5  # never a special id or the marker
        if self.image_token_id is not None:
            for row in range(self.batch_size):  # markers at different columns: text before a marker sees no image
                input_ids[row, 2 * row] = self.image_token_id
        size = self.vision_config["image_size"]
        inputs = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "pixel_values": floats_tensor([self.batch_size, 3, size, size]),
        }
        return config, inputs


class HiveCommonTests(ModelTesterMixin):
    """The mixin's tests for one configuration; subclassed once per configuration below."""

    all_model_classes = (HiveForConditionalGeneration,)
    _is_composite = True
    configuration: str = ""
    # Run `test_can_init_all_missing_weights` (the mixin skips files without a 2023+ copyright line).
    test_can_init_all_missing_weights_before_2023 = True
    # HIVE reads intermediate encoder layers: the tower's post_layernorm and SigLIP's pooling head get no
    # gradient by design (tests/test_training_features.py checks every HIVE and LM parameter gets one).
    test_all_params_have_gradient = False

    def setUp(self):
        self.model_tester = HiveModelTester(self, self.configuration)
        self.config_tester = ConfigTester(
            self,
            config_class=HiveConfig,
            has_text_modality=False,
            common_properties=["vision_layers", "llm_layers", "image_token_id", "gate_init"],
            vision_layers=[0, 1],
            llm_layers=[0, 1],
            # as a saved config.json holds them (JSON keys: id2label's ints become strings)
            vision_config=json.loads(json.dumps(self.model_tester.get_config().vision_config.to_dict())),
            text_config=json.loads(json.dumps(self.model_tester.get_config().text_config.to_dict())),
        )

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        # The mixin adds labels by looking the class up in transformers' built-in auto mappings, which list
        # only transformers' own classes; a causal (image-text-to-text) LM is trained on its input ids.
        inputs = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        if return_labels:
            inputs["labels"] = inputs["input_ids"].clone()
        return inputs

    def test_config(self):
        self.config_tester.run_common_tests()

    @unittest.skip(
        "GenerationTesterMixin is not in transformers' sdist; tests/test_generation_matrix.py covers generate"
    )
    def test_generation_tester_mixin_inheritance(self):
        pass

    @unittest.skip("composite by design: vision encoder + LM + HIVE modules, no base model (base_model_prefix='')")
    def test_model_base_model_prefix(self):
        pass


def _case(configuration: str) -> type:
    return type(
        f"HiveCommon_{configuration}",
        (HiveCommonTests, unittest.TestCase),
        {"configuration": configuration, "__module__": __name__},
    )


HiveCommon_siglip_marker = _case("siglip_marker")
HiveCommon_clip_marker = _case("clip_marker")
HiveCommon_captioning_ffn_all_after = _case("captioning_ffn_all_after")

pytestmark = pytest.mark.filterwarnings("ignore")
