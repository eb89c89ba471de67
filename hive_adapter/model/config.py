"""`HiveConfig`: every knob of a HIVE adapter, validated where the value is known.

HIVE (Hierarchical Pre-Training of Vision Encoders with LLMs, supplementary §6–§8) feeds a subset of
vision-encoder layers, each through its own light projector, to a matching subset of LLM decoder
layers through zero-gated cross-attention. This config says which layers, how they pair, and what the
cross-attention looks like. It is one class for both uses:

* the PEFT-style adapter (`get_hive_model(base, HiveConfig(...))`): `vision_config` / `text_config`
  stay `None` and layer counts are checked when the base model is wrapped;
* the full model (`HiveForConditionalGeneration`, `model_type="hive"`): the two sub-configs describe
  the vision encoder and the language model and everything is checked at construction.

Layer indices follow one convention everywhere: `vision_layers=[i]` is the *output* of encoder layer
`i` (0-based, negative counts from the end, so `-1` is the last layer) and `llm_layers=[j]` is decoder
layer `j` of the language model.
"""

from __future__ import annotations

import difflib
import inspect
import math
from typing import Any

from transformers import AutoConfig, PretrainedConfig

from .connectors import connector_for

# The layer arithmetic lived here until 0.3; its home is layer_choice (the registry reads it without this module).
from .layer_choice import DEFAULT_LEVEL_FRACTION as DEFAULT_LEVEL_FRACTION
from .layer_choice import ResolvedLayers
from .layer_choice import normalise_layers as normalise_layers
from .layer_choice import spread_layers as spread_layers

LEVEL_MAPPINGS = ("paired", "all")
PROJECTOR_TYPES = ("linear", "mlp2x_gelu", "lean")
PLACEMENTS = ("before", "after")
MEDIA_ATTENTION = ("previous", "all_previous")
FEATURE_SELECT = ("patch", "full")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


class HiveConfig(PretrainedConfig):
    r"""Configuration of a HIVE adapter or of a full `HiveForConditionalGeneration` model.

    Args:
        vision_layers (`list[int]`, *optional*):
            Vision-encoder layers whose outputs feed HIVE, shallow to deep. Default: about 25% of the
            encoder's layers spread evenly and ending at the last one.
        llm_layers (`list[int]`, *optional*):
            Decoder layers that receive gated cross-attention, shallow to deep. Default: as many as
            there are vision levels, spread evenly from layer 0.
        level_mapping (`str`, defaults to `"paired"`):
            `"paired"`: `llm_layers[k]` attends to level `vision_layers[k]` (shallow to shallow, deep to
            deep; the lists must have equal length). `"all"`: every listed depth attends to all levels,
            told apart by a learned level embedding.
        connector (`str`, defaults to `"hive"`):
            `"hive"`: multi-level cross-attention. `"cascaded"`: the same cross-attention depths, all fed
            by the deepest selected level only (the paper's cascaded baseline). `"concat"`: the
            self-attention baseline: the deepest selected level is projected and spliced into the LLM
            input at the image marker, as LLaVA does. `"deepstack"`: Qwen3-VL's DeepStack: concat's splice, and
            each shallower selected level added to the output of decoder layer k (k = 0, 1, ...) at the image
            tokens' positions (`llm_layers` is not read).
        tokens_per_level (`int`, *optional*):
            Pool each level to this many tokens (a square number: 2-D average pooling on the patch
            grid). `None` keeps every patch.
        vision_feature_select (`str`, defaults to `"patch"`):
            `"patch"` drops the tokens in front of the patch grid (CLS, registers); `"full"` keeps them.
        projector_type (`str`, defaults to `"mlp2x_gelu"`):
            `"linear"` or `"mlp2x_gelu"` (LLaVA's names: to the LLM width), or `"lean"`: one linear layer and
            a GELU to the narrower `media_width`, which is all the cross-attention's K/V projections need
            (the paper's `mlp2x_gelu` to the LLM width is then projected down again to the grouped K/V
            width). Not for `connector="concat"`, whose image tokens enter the LLM at its width.
        media_width (`int`, *optional*):
            Width of the projected levels the cross-attention reads. Default: the LLM width (`linear`,
            `mlp2x_gelu`); for `"lean"`, no wider than either side carries: the vision width and twice the
            grouped K/V width (keys and values), e.g. 512 for SigLIP-so400m + TinyLlama, 1024 for CLIP-L +
            Vicuna-7B.
        num_attention_heads (`int`, *optional*):
            Query heads of the cross-attention. Default: the language model's own; with the two below, they
            keep the grouped K/V width, and the cross-attention cost at the paper's ~0.12-0.14x of concat.
        num_key_value_heads (`int`, *optional*): key/value heads of the cross-attention (default: the LLM's).
        head_dim (`int`, *optional*): width of one head (default: the LLM's).
        use_ffn (`bool`, defaults to `False`):
            Add a tanh-gated feed-forward after each cross-attention (Flamingo style).
        ffn_mult (`int`, defaults to 4): hidden width of that FFN as a multiple of the LLM width.
        placement (`str`, defaults to `"before"`):
            Run the HIVE block `"before"` or `"after"` the wrapped decoder layer.
        media_attention (`str`, defaults to `"previous"`):
            With several images in a sample: `"previous"` lets a text token see only the latest image
            marked before it, `"all_previous"` every earlier image. Text before the first image sees
            none and gets exactly zero from HIVE.
        image_token_id (`int`, *optional*):
            The marker token that stands where an image goes. `None` on a base without one means pure
            captioning: one image per sample, seen by every token. On a llava-hf base it defaults to
            the base's own image token.
        cross_attn_implementation (`str`, *optional*):
            Cross-attention kernel: `"sdpa"`, `"eager"` (can return attention weights) or
            `"flash_attention_2"`. `None` follows the language model's setting.
        gate_init (`float`, defaults to 0.0):
            Initial value of the tanh gates. 0 makes a freshly wrapped model compute exactly what the
            base computed.
        initializer_range (`float`, *optional*):
            Std of HIVE's new linear weights and level embeddings. `None` (the default) scales it to each
            tensor's width: N(0, 1/fan_in) for a linear layer (LeCun's normal), N(0, 1/width) for the level
            embeddings, so a small model starts as fast as a large one (0.125 at width 64, 0.022 at 2,048). A
            number gives every new tensor that std (0.02, the earlier fixed default, is what configs saved
            before keep).
        layers_path (`str`, *optional*):
            Dotted attribute path to the decoder layer list, for models the built-in table does not place.
        vision_tower_path (`str`, *optional*): dotted attribute path to the vision tower, likewise.
        vision_config (`PretrainedConfig` or `dict`, *optional*):
            The vision encoder's config, in a full model (`HiveForConditionalGeneration`).
        text_config (`PretrainedConfig` or `dict`, *optional*): the language model's config, likewise.
    """

    model_type = "hive"
    sub_configs = {"vision_config": AutoConfig, "text_config": AutoConfig}

    def __init__(
        self,
        vision_layers: list[int] | None = None,
        llm_layers: list[int] | None = None,
        level_mapping: str = "paired",
        connector: str = "hive",
        tokens_per_level: int | None = None,
        vision_feature_select: str = "patch",
        projector_type: str = "mlp2x_gelu",
        media_width: int | None = None,
        num_attention_heads: int | None = None,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        use_ffn: bool = False,
        ffn_mult: int = 4,
        placement: str = "before",
        media_attention: str = "previous",
        image_token_id: int | None = None,
        cross_attn_implementation: str | None = None,
        gate_init: float = 0.0,
        initializer_range: float | None = None,
        layers_path: str | None = None,
        vision_tower_path: str | None = None,
        vision_config: PretrainedConfig | dict | None = None,
        text_config: PretrainedConfig | dict | None = None,
        **kwargs: Any,
    ):
        self.vision_layers = list(vision_layers) if vision_layers is not None else None
        self.llm_layers = list(llm_layers) if llm_layers is not None else None
        self.level_mapping = level_mapping
        self.connector = connector
        self.tokens_per_level = tokens_per_level
        self.vision_feature_select = vision_feature_select
        self.projector_type = projector_type
        self.media_width = media_width
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.use_ffn = use_ffn
        self.ffn_mult = ffn_mult
        self.placement = placement
        self.media_attention = media_attention
        self.image_token_id = image_token_id
        self.cross_attn_implementation = cross_attn_implementation
        self.gate_init = gate_init
        self.initializer_range = initializer_range
        self.layers_path = layers_path
        self.vision_tower_path = vision_tower_path
        self.vision_config = _as_config(vision_config, "vision_config")
        self.text_config = _as_config(text_config, "text_config")
        _refuse_near_misses(kwargs)
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Check every value that can be checked without a model; raise `ValueError` naming it."""
        connector = connector_for(self.connector)  # an unknown name is refused, naming the registered ones
        for name, allowed in (
            ("level_mapping", LEVEL_MAPPINGS),
            ("projector_type", PROJECTOR_TYPES),
            ("placement", PLACEMENTS),
            ("media_attention", MEDIA_ATTENTION),
            ("vision_feature_select", FEATURE_SELECT),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name}={value!r}: expected one of {', '.join(map(repr, allowed))}")
        if self.cross_attn_implementation not in (None, *ATTN_IMPLEMENTATIONS):
            raise ValueError(
                f"cross_attn_implementation={self.cross_attn_implementation!r}: expected one of "
                f"{', '.join(map(repr, ATTN_IMPLEMENTATIONS))} or None (follow the language model)"
            )
        for name in ("vision_layers", "llm_layers"):
            value = getattr(self, name)
            if value is None:
                continue
            if not value or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
                raise ValueError(f"{name}={value!r}: expected a non-empty list of layer indices (ints)")
        connector.validate(self)
        if self.tokens_per_level is not None:
            n = self.tokens_per_level
            if not isinstance(n, int) or isinstance(n, bool) or n < 1 or math.isqrt(n) ** 2 != n:
                raise ValueError(
                    f"tokens_per_level={n!r}: must be a square number (1, 4, 9, ..., 144, ...) so it can be reached "
                    "by 2-D pooling on the patch grid, or None to keep every patch"
                )
            if self.vision_feature_select != "patch":
                raise ValueError(
                    f"tokens_per_level={n} needs vision_feature_select='patch': only the patch grid can be pooled"
                )
        if not isinstance(self.use_ffn, bool):
            raise ValueError(f"use_ffn={self.use_ffn!r}: expected True or False")
        for name, low in (("gate_init", None), ("initializer_range", 0.0)):
            value = getattr(self, name)
            if name == "initializer_range" and value is None:  # scaled to each tensor's width
                continue
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or not math.isfinite(value) or (low is not None and value <= low):
                expected = "a finite number" if low is None else f"a finite number above {low}"
                if name == "initializer_range":
                    expected += ", or None (the default: each layer's std scaled to its width, 1/sqrt(fan_in))"
                raise ValueError(f"{name}={value!r}: expected {expected}")
        if self.media_width is not None and self.projector_type != "lean":
            raise ValueError(
                f"media_width={self.media_width}: only projector_type='lean' projects to its own width (the "
                f"'{self.projector_type}' projector ends at the LLM width)"
            )
        for name in ("num_attention_heads", "num_key_value_heads", "head_dim", "ffn_mult", "media_width"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name}={value!r}: expected a positive int")
        if (
            self.num_attention_heads is not None
            and self.num_key_value_heads is not None
            and self.num_attention_heads % self.num_key_value_heads
        ):
            raise ValueError(
                f"num_key_value_heads={self.num_key_value_heads}: must divide num_attention_heads="
                f"{self.num_attention_heads} (grouped-query attention)"
            )
        if self.vision_config is not None and self.text_config is not None:
            self.resolve_layers(
                num_vision_layers=self.vision_config.num_hidden_layers,
                num_llm_layers=self.text_config.num_hidden_layers,
            )

    def resolve_layers(self, *, num_vision_layers: int, num_llm_layers: int) -> ResolvedLayers:
        """Defaults filled in, negative indices resolved and ranges checked for one model pair (the connector
        decides how levels map to decoder layers: `hive_adapter.model.connectors`)."""
        return connector_for(self.connector).resolve_layers(
            self, num_vision_layers=num_vision_layers, num_llm_layers=num_llm_layers
        )

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for key in ("vision_config", "text_config"):  # None for an adapter's config, as transformers writes it
            value = getattr(self, key)
            out[key] = value.to_dict() if isinstance(value, PretrainedConfig) else None
        return out

    def adapter_dict(self) -> dict[str, Any]:
        """The HIVE knobs only (what `hive_config.json` holds next to an adapter)."""
        keys = (
            "vision_layers llm_layers level_mapping connector tokens_per_level vision_feature_select projector_type "
            "media_width "
            "num_attention_heads num_key_value_heads head_dim use_ffn ffn_mult placement media_attention "
            "image_token_id cross_attn_implementation gate_init initializer_range layers_path vision_tower_path"
        ).split()
        out = {key: getattr(self, key) for key in keys}
        out["model_type"] = self.model_type
        return out


def _refuse_near_misses(kwargs: dict[str, Any]) -> None:
    """An unknown keyword that is a near miss of a HIVE field is a typo (`vision_layer=`), not a custom
    attribute: refuse it, naming the field meant. Other unknown keywords are kept, as transformers keeps them."""
    fields = [name for name in inspect.signature(HiveConfig.__init__).parameters if name not in ("self", "kwargs")]
    own = set(vars(PretrainedConfig()))  # what transformers keeps itself (`attn_implementation` as `_..._internal`)
    for key in kwargs:
        if key in fields or hasattr(PretrainedConfig, key) or key.startswith("_") or key == "torch_dtype":
            continue
        if {key, f"_{key}", f"_{key}_internal"} & own:
            continue
        close = difflib.get_close_matches(key, fields, n=1, cutoff=0.8)
        if close:
            raise ValueError(f"HiveConfig got an unknown field {key!r}; did you mean {close[0]!r}?")


def _as_config(value: PretrainedConfig | dict | None, name: str) -> PretrainedConfig | None:
    if value is None or isinstance(value, PretrainedConfig):
        return value
    if isinstance(value, dict):
        value = dict(value)
        model_type = value.pop("model_type", None)
        if model_type is None:
            raise ValueError(f"{name} is a dict without 'model_type'; cannot tell which config class it is")
        return AutoConfig.for_model(model_type, **value)
    raise ValueError(f"{name}={value!r}: expected a transformers config, a dict or None")
