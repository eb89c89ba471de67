"""The config vLLM reads for a HIVE checkpoint: `HiveConfig`, flagged as an encoder-decoder model.

vLLM takes a model for encoder-decoder (images as encoder input, cross-attention K/V cached per request, chunked
prefill and prefix caching off) when its config says `is_encoder_decoder`. A saved `HiveConfig` must not say so
(transformers' `generate` would then treat the model as a seq2seq model), so the flag is set only in the class
vLLM builds the config with.
"""

from __future__ import annotations

from hive_adapter.model.config import HiveConfig


class HiveServingConfig(HiveConfig):
    """`HiveConfig` as vLLM sees it: an encoder-decoder model (the vision tower is the encoder)."""

    def __init__(self, **kwargs):
        kwargs.pop("is_encoder_decoder", None)
        super().__init__(**kwargs)
        self.is_encoder_decoder = True


def register_config() -> None:
    """vLLM builds `model_type="hive"` configs with `HiveServingConfig`."""
    from vllm.transformers_utils import config as vllm_config

    vllm_config._CONFIG_REGISTRY["hive"] = HiveServingConfig
