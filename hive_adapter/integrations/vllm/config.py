"""The config vLLM reads for a HIVE checkpoint: `HiveConfig`, flagged as an encoder-decoder model.

vLLM takes a model for encoder-decoder (images as encoder input, cross-attention K/V cached per request, chunked
prefill and prefix caching off) when its config says `is_encoder_decoder`. A saved `HiveConfig` must not say so
(transformers' `generate` would then treat the model as a seq2seq model), so the flag is set only in the class
vLLM builds the config with.
"""

from __future__ import annotations

from hive_adapter.model.config import HiveConfig


class HiveServingConfig(HiveConfig):
    """`HiveConfig` as vLLM sees it: an encoder-decoder model (the vision tower is the encoder). What the plugin
    cannot serve is refused here, when vLLM reads `config.json`, before any engine process starts."""

    def __init__(self, **kwargs):
        kwargs.pop("is_encoder_decoder", None)
        super().__init__(**kwargs)
        self.is_encoder_decoder = True
        refuse_unservable(self)


def refuse_unservable(config) -> None:
    """What this plugin does not serve yet, refused by name before any weight is read."""
    if config.connector == "concat":
        raise ValueError(
            "connector='concat' splices the image tokens into the prompt (LLaVA's way): serve it with vLLM's own "
            "LLaVA support; this plugin serves HIVE's cross-attention connectors ('hive', 'cascaded')"
        )
    if config.level_mapping != "paired" and config.connector == "hive":
        raise ValueError(
            f"level_mapping={config.level_mapping!r}: every block reading every level needs K/V of another length "
            "than one level's; the vLLM plugin serves level_mapping='paired'"
        )
    if config.vision_feature_select != "patch":
        raise ValueError(
            f"vision_feature_select={config.vision_feature_select!r}: the vLLM plugin serves 'patch' models (its "
            "encoder input counts the patch grid only, not the tokens in front of it)"
        )


def register_config() -> None:
    """vLLM builds `model_type="hive"` configs with `HiveServingConfig`."""
    from vllm.transformers_utils import config as vllm_config

    vllm_config._CONFIG_REGISTRY["hive"] = HiveServingConfig
