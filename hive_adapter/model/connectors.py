"""Connectors: how the vision levels reach the language model, one class each, in one registry.

A connector decides three things, and nothing outside this module branches on its name:

- which vision levels feed which decoder layers (`resolve_layers`, from the config's layer lists);
- which modules HIVE builds for it (a level embedding when every block reads every level);
- the data flow of a forward and of `generate` (`forward`, `generate`): cross-attention from hooked decoder
  layers (`hive`, `cascaded`), or image tokens spliced into the input (`concat`, the self-attention baseline;
  `deepstack`, Qwen3-VL's, also adds the shallower levels in the first decoder layers: `deepstack.py`).

Adding one is a class and a `register_connector` call (CONTRIBUTING, "A new connector"; a toy one plugs in
in `tests/test_connectors.py`). Peers keep such a table too: PEFT's tuner registry, LLaVA's projector factory.
"""

from __future__ import annotations

from .connector_base import _REGISTRY
from .connector_base import Connector as Connector
from .connector_base import register_connector as register_connector
from .layer_choice import LayerRequest, ResolvedLayers
from .packing import check_packed_language_model, flash_packing_kwargs, packed_segments
from .splice_connectors import ConcatConnector as ConcatConnector
from .splice_connectors import DeepStackConnector as DeepStackConnector


def connector_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def connector_for(name: str) -> Connector:
    """The connector registered as `name`, or a `ValueError` listing those that are."""
    if name not in _REGISTRY:
        raise ValueError(f"connector={name!r}: expected one of {', '.join(map(repr, _REGISTRY))}")
    return _REGISTRY[name]()


class CrossAttentionConnector(Connector):
    """Vision levels read by gated cross-attention inside chosen decoder layers; image tokens never enter the
    sequence. The prompt's vision context is built once and read by every hooked block (`HiveRuntime`)."""

    name = "hive"

    def validate(self, config: LayerRequest) -> None:
        if (
            self.pairs_levels(config)
            and config.vision_layers is not None
            and config.llm_layers is not None
            and len(config.vision_layers) != len(config.llm_layers)
        ):
            raise ValueError(
                f"vision_layers={config.vision_layers} and llm_layers={config.llm_layers} have different lengths "
                f"({len(config.vision_layers)} vs {len(config.llm_layers)}); level_mapping='paired' pairs them one "
                "to one. Give lists of equal length or use level_mapping='all'."
            )

    def pairs_levels(self, config: LayerRequest) -> bool:
        return config.level_mapping == "paired"

    def level_embedding(self, config: LayerRequest) -> bool:
        return config.level_mapping == "all"

    def resolve_layers(self, config: LayerRequest, *, num_vision_layers: int, num_llm_layers: int) -> ResolvedLayers:
        levels = self.vision_levels(config, num_vision_layers)
        depths = self.llm_depths(config, levels, num_llm_layers)
        if config.level_mapping == "all":
            return ResolvedLayers(tuple(levels), tuple(depths), (None,) * len(depths))
        if len(levels) != len(depths):
            raise ValueError(
                f"vision_layers={levels} and llm_layers={depths} have different lengths; level_mapping='paired' "
                "pairs them one to one"
            )
        return ResolvedLayers(tuple(levels), tuple(depths), tuple(range(len(depths))))

    def forward(self, model, language_model, *, input_ids, pixel_values, attention_mask, labels, inputs_embeds,
                past_key_values, vision_inputs, **kwargs):  # fmt: skip
        # Packed rows (position ids restarting, no mask, no cache): transformers masks the self-attention
        # block-diagonally, the context keeps each token's cross-attention within its own sample.
        segments = packed_segments(
            kwargs.get("position_ids"), attention_mask=attention_mask, past_key_values=past_key_values
        )
        if segments is not None:
            check_packed_language_model(language_model, kwargs)
            kwargs.update(flash_packing_kwargs(language_model, kwargs["position_ids"]))
        runtime = model.hive_runtime
        prompt = runtime.prompt_for_call(past_key_values=past_key_values, has_images=pixel_values is not None)
        if prompt is None:  # a new prompt
            prompt = model.hive_prompt_context(
                input_ids, inputs_embeds, pixel_values, segments=segments, **vision_inputs
            )
        text = {"input_ids": input_ids} if inputs_embeds is None else {"inputs_embeds": inputs_embeds}
        with runtime.forward_scope(prompt):  # current while the language model runs, released however it ends
            return language_model(
                **text, attention_mask=attention_mask, labels=labels, past_key_values=past_key_values, **kwargs
            )

    def generate(self, model, generate, *, input_ids, pixel_values, attention_mask, inputs_embeds, vision_inputs,
                 **kwargs):  # fmt: skip
        text = {"input_ids": input_ids, "inputs_embeds": inputs_embeds}
        text = {name: value for name, value in text.items() if value is not None}
        context = model.hive_prompt_context(input_ids, inputs_embeds, pixel_values, **vision_inputs)
        with model.hive_runtime.pinned_to(context):  # one prompt for every decoding step, released at the end
            return generate(**text, attention_mask=attention_mask, **kwargs)


class CascadedConnector(CrossAttentionConnector):
    """The paper's cascaded baseline: HIVE's cross-attention depths, every one fed the deepest level only."""

    name = "cascaded"

    def pairs_levels(self, config: LayerRequest) -> bool:
        return False

    def level_embedding(self, config: LayerRequest) -> bool:
        return False

    def resolve_layers(self, config: LayerRequest, *, num_vision_layers: int, num_llm_layers: int) -> ResolvedLayers:
        levels = self.vision_levels(config, num_vision_layers)
        depths = self.llm_depths(config, levels, num_llm_layers)
        return ResolvedLayers((levels[-1],), tuple(depths), (0,) * len(depths))


for _connector in (CrossAttentionConnector, CascadedConnector, ConcatConnector, DeepStackConnector):
    register_connector(_connector)
