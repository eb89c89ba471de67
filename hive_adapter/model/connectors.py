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

import inspect
from typing import Any, ClassVar

import torch

from .deepstack import added_after_layers
from .layer_choice import DEFAULT_LEVEL_FRACTION, LayerRequest, ResolvedLayers, normalise_layers, spread_layers
from .packing import check_packed_language_model, flash_packing_kwargs, packed_segments
from .runtime import past_length_of
from .splice import splice_image_tokens, splice_packed

_REGISTRY: dict[str, type[Connector]] = {}


def register_connector(connector: type[Connector]) -> type[Connector]:
    """Make `connector` (a `Connector` subclass with a `name`) available as `HiveConfig(connector=name)`.
    A name already registered is refused, as PEFT refuses a second tuner of one name. Usable as a decorator."""
    if not (isinstance(connector, type) and issubclass(connector, Connector)):
        raise TypeError(
            f"register_connector({connector!r}): expected a subclass of hive_adapter.model.connectors.Connector"
        )
    name = getattr(connector, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{connector.__name__} has no `name`: set name = '...' on the class")
    if name in _REGISTRY and _REGISTRY[name] is not connector:
        raise ValueError(
            f"a connector named {name!r} is registered already ({_REGISTRY[name].__name__}); choose another name"
        )
    _REGISTRY[name] = connector
    return connector


def connector_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def connector_for(name: str) -> Connector:
    """The connector registered as `name`, or a `ValueError` listing those that are."""
    if name not in _REGISTRY:
        raise ValueError(f"connector={name!r}: expected one of {', '.join(map(repr, _REGISTRY))}")
    return _REGISTRY[name]()


class Connector:
    """The verbs a front end needs from a connector. Subclasses set `name` and override what differs."""

    name: ClassVar[str]
    uses_cross_attention: ClassVar[bool] = True  # blocks hooked into decoder layers read the vision context

    # ------------------------------------------------------------------ configuration
    def validate(self, config: LayerRequest) -> None:
        """Connector-specific checks of a config, before any model is built (`HiveConfig.validate`)."""

    def check_base(self, base_model: torch.nn.Module) -> None:
        """Refuse, at wrap time and naming the reason, a base model this connector cannot drive (`get_hive_model`)."""

    def pairs_levels(self, config: LayerRequest) -> bool:
        """Whether level k feeds decoder layer k one to one (then the two lists have equal length)."""
        return False

    def level_embedding(self, config: LayerRequest) -> bool:
        """Whether the level encoder adds a learned embedding per level (blocks that read every level)."""
        return False

    def resolve_layers(self, config: LayerRequest, *, num_vision_layers: int, num_llm_layers: int) -> ResolvedLayers:
        raise NotImplementedError

    def vision_levels(self, config: LayerRequest, num_vision_layers: int) -> list[int]:
        """The selected encoder levels: the config's, or ~25% spread shallow to deep, ending at the last layer."""
        if config.vision_layers is not None:
            return normalise_layers(config.vision_layers, num_vision_layers, "vision_layers", "vision encoder")
        count = max(1, round(DEFAULT_LEVEL_FRACTION * num_vision_layers))
        if self.pairs_levels(config) and config.llm_layers is not None:
            count = len(config.llm_layers)
            if count > num_vision_layers:
                raise ValueError(
                    f"llm_layers={config.llm_layers}: {count} paired depths need {count} vision levels, the vision "
                    f"encoder has {num_vision_layers} layers"
                )
        return spread_layers(count, num_vision_layers, end_at_last=True)

    def llm_depths(self, config: LayerRequest, levels: list[int], num_llm_layers: int) -> list[int]:
        """The decoder layers that get a block: the config's, or one per level spread from layer 0."""
        if config.llm_layers is not None:
            return normalise_layers(config.llm_layers, num_llm_layers, "llm_layers", "language model")
        if len(levels) > num_llm_layers:
            raise ValueError(
                f"vision_layers={levels}: {len(levels)} levels need as many decoder layers, the language model "
                f"has {num_llm_layers}; pass llm_layers explicitly"
            )
        return spread_layers(len(levels), num_llm_layers, end_at_last=False)

    # ------------------------------------------------------------------ data flow
    def forward(self, model, language_model: torch.nn.Module, **inputs: Any):
        """One forward of the language model with the images seen through this connector (`HiveMixin`)."""
        raise NotImplementedError

    def hidden_states(self, model, decoder: torch.nn.Module, **inputs: Any):
        """The decoder stack's output (no LM head) with one hidden state per input column, `last_hidden_state`
        (`HiveBackbone`, what TRL's fused LM head reads): `forward` on the decoder, for a connector that leaves
        the sequence as it is."""

        def run_decoder(*, labels=None, **decoder_inputs: Any):  # a backbone has no loss: labels stay out
            return decoder(**decoder_inputs)

        return self.forward(model, run_decoder, labels=None, **inputs)

    def generate(self, model, generate, **inputs: Any):
        """`generate` of the language model with the prompt's images seen through this connector."""
        raise NotImplementedError


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


class ConcatConnector(Connector):
    """The self-attention baseline: the deepest selected level projected and spliced into the LLM input at the
    image marker, as LLaVA does (`splice.py`). No cross-attention. Every resolved level before the deepest (none
    for concat; `DeepStackConnector`'s) is spliced likewise into zeros and added after decoder layer k
    (`deepstack.py`)."""

    name = "concat"
    uses_cross_attention = False

    def validate(self, config: LayerRequest) -> None:
        if config.projector_type == "lean":
            raise ValueError(
                f"projector_type='lean' with connector={self.name!r}: {self.name} splices the projected tokens into "
                f"the LLM input at its width; use 'mlp2x_gelu' or 'linear' for {self.name}"
            )

    def check_base(self, base_model: torch.nn.Module) -> None:
        """concat feeds the base input embeddings with the image tokens spliced in, in `forward` and `generate`."""
        name = type(base_model).__name__
        prepare = getattr(base_model, "prepare_inputs_for_generation", None)
        if prepare is not None and "inputs_embeds" not in inspect.signature(prepare).parameters:
            raise ValueError(
                f"connector={self.name!r} cannot drive {name}: its generate takes no inputs_embeds, and {self.name} "
                "splices the image tokens into the input embeddings; use connector='hive' or 'cascaded' on this model"
            )

    def resolve_layers(self, config: LayerRequest, *, num_vision_layers: int, num_llm_layers: int) -> ResolvedLayers:
        return ResolvedLayers((self.vision_levels(config, num_vision_layers)[-1],), (), ())

    def forward(self, model, language_model, *, input_ids, pixel_values, attention_mask, labels, inputs_embeds,
                past_key_values, vision_inputs, **kwargs):  # fmt: skip
        text = {"input_ids": input_ids} if inputs_embeds is None else {"inputs_embeds": inputs_embeds}
        segments = packed_segments(
            kwargs.get("position_ids"), attention_mask=attention_mask, past_key_values=past_key_values
        )
        if segments is not None:
            check_packed_language_model(language_model, kwargs)
            embeddings, kwargs["position_ids"], labels, additions = self.packed_embeddings(
                model, input_ids, inputs_embeds, pixel_values, segments, kwargs["position_ids"], labels, vision_inputs
            )
            kwargs.update(flash_packing_kwargs(language_model, kwargs["position_ids"]))
            with added_after_layers(model, additions):
                return language_model(inputs_embeds=embeddings, labels=labels, **kwargs)
        additions = []
        if pixel_values is not None or (model.training and torch.is_grad_enabled()):
            # (A training step without images still runs every projector: ZeRO-3 must see each parameter.)
            if past_length_of(past_key_values) > 0:
                raise ValueError(
                    "connector='concat': pixel_values came with a decoding step (the cache already holds "
                    f"{past_length_of(past_key_values)} tokens); images are spliced into the prompt, pass them "
                    "with it"
                )
            embeddings, attention_mask, labels, additions = self.embeddings(
                model,
                input_ids,
                inputs_embeds,
                pixel_values,
                attention_mask,
                labels,
                vision_inputs,
                padding_side="right",
            )
            text = {"inputs_embeds": embeddings}
        # else text alone: a decoding step, or embeddings `generate` already spliced
        with added_after_layers(model, additions):
            return language_model(
                **text, attention_mask=attention_mask, labels=labels, past_key_values=past_key_values, **kwargs
            )

    def hidden_states(self, model, decoder, *, input_ids, pixel_values, attention_mask, inputs_embeds,
                      past_key_values, vision_inputs, **kwargs):  # fmt: skip
        """The decoder's output on the spliced sequence, `last_hidden_state` gathered back to the input's columns:
        a marker's column takes its image's last token, whose hidden state predicts the text after the image.
        Only `last_hidden_state` is gathered (the cache and any `hidden_states` stay spliced)."""
        if pixel_values is None and not (model.training and torch.is_grad_enabled()):
            return super().hidden_states(
                model, decoder, input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                inputs_embeds=inputs_embeds, past_key_values=past_key_values, vision_inputs=vision_inputs, **kwargs,
            )  # fmt: skip
        if past_length_of(past_key_values) > 0:
            raise ValueError("connector='concat': a backbone forward takes whole prompts, not decoding steps")
        embeddings, spliced_mask, _, *positions, additions = self.embeddings(
            model, input_ids, inputs_embeds, pixel_values, attention_mask, None, vision_inputs,
            padding_side="right", return_positions=True,
        )  # fmt: skip
        with added_after_layers(model, additions):
            output = decoder(
                inputs_embeds=embeddings, attention_mask=spliced_mask, past_key_values=past_key_values, **kwargs
            )
        if positions:  # images were spliced in (without images the columns are the input's)
            hidden = output.last_hidden_state
            index = positions[0].unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
            output.last_hidden_state = hidden.gather(1, index)
        return output

    def generate(self, model, generate, *, input_ids, pixel_values, attention_mask, inputs_embeds, vision_inputs,
                 **kwargs):  # fmt: skip
        embeddings, attention_mask, _, additions = self.embeddings(
            model, input_ids, inputs_embeds, pixel_values, attention_mask, None, vision_inputs, padding_side="left"
        )
        with added_after_layers(model, additions):
            output = generate(inputs_embeds=embeddings, attention_mask=attention_mask, **kwargs)
        if input_ids is None:
            return output  # from embeddings alone: the new tokens only, as transformers returns them
        # From token ids: the prompt in front of the new tokens, in the tensor and in `sequences` alike.
        new_tokens = output if isinstance(output, torch.Tensor) else output.sequences
        prompt = input_ids.repeat_interleave(new_tokens.shape[0] // input_ids.shape[0], 0)
        sequences = torch.cat([prompt, new_tokens], 1)
        if isinstance(output, torch.Tensor):
            return sequences
        output.sequences = sequences
        return output

    @staticmethod
    def images_to_splice(model, input_ids, inputs_embeds, pixel_values, vision_inputs):
        """(input embeddings, per resolved level, shallow to deep, each image's tokens to splice: (images, tokens,
        hidden), or a list of (tokens_i, hidden) for NaFlex grids). Without images the levels are None and every
        projector still runs (ZeRO-3 must see every parameter), adding exactly zero to the embeddings."""
        embeddings = inputs_embeds if inputs_embeds is not None else model.get_input_embeddings()(input_ids)
        vision = model.hive_vision
        if pixel_values is None:
            levels, _ = vision.encode(**vision.dummy_inputs(embeddings.device))
            return embeddings + 0.0 * sum(level.sum() for level in levels).to(embeddings.dtype), None
        pixel_values, _ = vision.usable(pixel_values, vision_inputs, training=model.training)  # left out: blank
        levels, token_mask = vision.encode(pixel_values, **vision_inputs)
        levels = [level.to(embeddings.dtype) for level in levels]
        if token_mask is not None:  # NaFlex: each image's real tokens only
            levels = [[image[real] for image, real in zip(level, token_mask, strict=True)] for level in levels]
        return embeddings, levels

    @staticmethod
    def packed_embeddings(model, input_ids, inputs_embeds, pixel_values, segments, position_ids, labels,
                          vision_inputs):  # fmt: skip
        """Input embeddings of packed rows with each image's tokens inside its own sample (`splice_packed`), the
        position ids and labels of the spliced rows, and the shallower levels' additions (spliced into zeros)."""
        embeddings, levels = ConcatConnector.images_to_splice(
            model, input_ids, inputs_embeds, pixel_values, vision_inputs
        )
        if levels is None:
            return embeddings, position_ids, labels, []
        markers = model.hive_markers(input_ids, inputs_embeds)
        spliced = splice_packed(
            markers=markers, segments=segments, embeddings=embeddings, images=levels[-1], labels=labels
        )
        zeros = torch.zeros_like(embeddings)
        additions = [
            splice_packed(markers=markers, segments=segments, embeddings=zeros, images=level, labels=None)[0]
            for level in levels[:-1]
        ]
        return *spliced, additions

    @staticmethod
    def embeddings(model, input_ids, inputs_embeds, pixel_values, attention_mask, labels, vision_inputs, *,
                   padding_side: str, return_positions: bool = False):  # fmt: skip
        """Input embeddings with each image's deepest-level tokens spliced in at its marker, mask, labels (and, with
        `return_positions`, where each input column landed: `splice_image_tokens`; not without images), then the
        shallower levels' additions: each spliced likewise into zeros (none for concat, none without images).

        Without images every projector still runs (ZeRO-3 must see every parameter) and adds exactly zero.
        """
        embeddings, levels = ConcatConnector.images_to_splice(
            model, input_ids, inputs_embeds, pixel_values, vision_inputs
        )
        if levels is None:
            return embeddings, attention_mask, labels, []
        markers = model.hive_markers(input_ids, inputs_embeds)
        spliced = splice_image_tokens(
            markers=markers,
            embeddings=embeddings,
            images=levels[-1],
            attention_mask=attention_mask,
            labels=labels,
            padding_side=padding_side,
            return_positions=return_positions,
        )
        zeros = torch.zeros_like(embeddings)
        additions = [
            splice_image_tokens(
                markers=markers, embeddings=zeros, images=level, attention_mask=attention_mask, labels=None,
                padding_side=padding_side,
            )[0]
            for level in levels[:-1]
        ]  # fmt: skip
        return *spliced, additions


class DeepStackConnector(ConcatConnector):
    """Qwen3-VL's DeepStack as a baseline: the deepest selected level spliced in as image tokens (as `concat`), and
    each shallower level k, projected by its own projector, added to the output of decoder layer k at those image
    tokens' positions (Qwen3-VL's `deepstack_visual_indexes` into its first decoder layers). `llm_layers` is not
    read: the levels go to the first decoder layers, in order, as in Qwen3-VL. One level is concat exactly."""

    name = "deepstack"

    def resolve_layers(self, config: LayerRequest, *, num_vision_layers: int, num_llm_layers: int) -> ResolvedLayers:
        levels = self.vision_levels(config, num_vision_layers)
        if len(levels) - 1 > num_llm_layers:
            raise ValueError(
                f"vision_layers={levels}: connector='deepstack' adds the {len(levels) - 1} levels before the deepest "
                f"to as many first decoder layers, the language model has {num_llm_layers}; select fewer levels"
            )
        return ResolvedLayers(tuple(levels), (), ())


for _connector in (CrossAttentionConnector, CascadedConnector, ConcatConnector, DeepStackConnector):
    register_connector(_connector)
