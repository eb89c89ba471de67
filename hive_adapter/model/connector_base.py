"""What a connector is (`connectors.py` is the registry of the built-in ones): the `Connector` base class, its
verbs (layer resolution, the modules it needs, forward and generate), and `register_connector`, how a connector
joins the registry (CONTRIBUTING, "A new connector")."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .layer_choice import DEFAULT_LEVEL_FRACTION, LayerRequest, ResolvedLayers, normalise_layers, spread_layers


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
