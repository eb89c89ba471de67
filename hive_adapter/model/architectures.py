"""Where models keep the parts HIVE needs: found the way transformers finds them, then a table of attribute paths.

transformers 5.x models answer `get_encoder(modality="image")` (the vision tower) and `get_decoder()` (the
language model, whose layer list HIVE hooks); those come first. Models that do not answer (older transformers,
the LLaVA repository's classes) are placed by a table of attribute paths, not tests on model names: a new
architecture is one more row. A model neither can place gets an error that names what was tried and the
`HiveConfig` field (`layers_path`, `vision_tower_path`) that places it by hand.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PretrainedConfig

# Decoder layer lists, tried in order. The first match wins, so wrappers come before what they wrap.
LAYER_PATHS: tuple[str, ...] = (
    "model.language_model.layers",  # llava-hf and other *ForConditionalGeneration, transformers >= 4.52
    "language_model.model.layers",  # llava-hf, transformers < 4.52; HiveForConditionalGeneration
    "model.text_model.layers",  # Idefics3 / SmolVLM
    "text_model.layers",
    "model.layers",  # *ForCausalLM: Llama, Qwen2/3, Mistral, Gemma/Gemma-2, the LLaVA repo's LlavaLlama
    "layers",  # bare decoder stacks (LlamaModel, Qwen2Model, ...)
    "language_model.layers",  # composite models holding a bare stack
    "transformer.h",  # GPT-2, Falcon, Bloom
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "model.decoder.layers",  # OPT
)

# Vision encoders inside a vision-language base model.
VISION_TOWER_PATHS: tuple[str, ...] = (
    "model.vision_tower",  # llava-hf, transformers >= 4.52
    "vision_tower",  # llava-hf, transformers < 4.52
    "vision_model",  # HiveForConditionalGeneration, Idefics-style
    "model.vision_model",
    "model.visual",  # Qwen2-VL, Qwen2.5-VL, Qwen3-VL
    "visual",
)

# Config attributes that name the image placeholder token.
IMAGE_TOKEN_ATTRIBUTES: tuple[str, ...] = ("image_token_id", "image_token_index")


def get_path(root: nn.Module, path: str):
    """`root.a.b.c` for `path="a.b.c"`, or None where any step is missing."""
    node = root
    for part in path.split("."):
        node = getattr(node, part, None)
        if node is None:
            return None
    return node


def path_of(root: nn.Module, module: nn.Module) -> str | None:
    """The dotted name of `module` inside `root`, or None when `root` does not hold it."""
    for name, candidate in root.named_modules(remove_duplicate=False):
        if candidate is module:
            return name
    return None


def _decoder_layers_by_transformers(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The layer list of what `model.get_decoder()` returns (transformers 5.x), with its path in `model`."""
    get_decoder = getattr(model, "get_decoder", None)
    if not callable(get_decoder):
        return None
    try:
        decoder = get_decoder()
    except (AttributeError, NotImplementedError, ValueError):
        return None
    layers = getattr(decoder, "layers", None) if isinstance(decoder, nn.Module) else None
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        return None
    path = path_of(model, layers)
    return None if path is None else (path, layers)


def find_decoder_layers(model: nn.Module, layers_path: str | None = None) -> tuple[str, nn.ModuleList]:
    """The decoder layer list of a (vision-)language model and the path it was found at: `layers_path` when
    given, else the layers of `model.get_decoder()`, else the first path of `LAYER_PATHS` that holds a list."""
    if layers_path:
        layers = get_path(model, layers_path)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers_path, layers
        raise ValueError(f"layers_path={layers_path!r}: {type(model).__name__} has no non-empty nn.ModuleList there")
    found = _decoder_layers_by_transformers(model)
    if found is not None:
        return found
    for path in LAYER_PATHS:
        layers = get_path(model, path)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return path, layers
    raise ValueError(
        f"cannot find the decoder layers of {type(model).__name__}: tried get_decoder().layers, then "
        f"{', '.join(LAYER_PATHS)}. Pass HiveConfig(layers_path='dotted.path.to.layers')."
    )


def _vision_tower_by_transformers(model: nn.Module) -> nn.Module | None:
    """What `model.get_encoder(modality="image")` returns (transformers 5.x), unless that is the model itself."""
    get_encoder = getattr(model, "get_encoder", None)
    if not callable(get_encoder):
        return None
    try:
        encoder = get_encoder(modality="image")
    except (AttributeError, NotImplementedError, TypeError, ValueError):  # older signatures, text-only models
        return None
    if not isinstance(encoder, nn.Module) or encoder is model or getattr(encoder, "config", None) is None:
        return None
    if path_of(model, encoder) in (None, "") or _is_language_part(model, encoder):
        return None
    return encoder


def _is_language_part(model: nn.Module, module: nn.Module) -> bool:
    """A module holding the decoder layers is no vision tower (get_encoder falls back to such modules)."""
    found = _decoder_layers_by_transformers(model)
    return found is not None and any(candidate is found[1] for candidate in module.modules())


def find_vision_tower(model: nn.Module, vision_tower_path: str | None = None) -> nn.Module:
    """The vision encoder of a vision-language model: `vision_tower_path` when given, else what
    `model.get_encoder(modality="image")` returns, else the first path of `VISION_TOWER_PATHS` that holds one."""
    if vision_tower_path:
        tower = get_path(model, vision_tower_path)
        if isinstance(tower, nn.Module):
            return tower
        raise ValueError(f"vision_tower_path={vision_tower_path!r}: {type(model).__name__} has no module there")
    tower = _vision_tower_by_transformers(model)
    if tower is not None:
        return tower
    for path in VISION_TOWER_PATHS:
        tower = get_path(model, path)
        if isinstance(tower, nn.Module):
            return tower
    raise ValueError(
        f"cannot find a vision encoder in {type(model).__name__}: tried get_encoder(modality='image'), then "
        f"{', '.join(VISION_TOWER_PATHS)}. Pass HiveConfig(vision_tower_path=...), or compose a model with "
        "HiveForConditionalGeneration.from_vision_text(vision_model, language_model, config)."
    )


def text_config_of(config: PretrainedConfig) -> PretrainedConfig:
    """The language model's config inside a composite config (or the config itself)."""
    if hasattr(config, "get_text_config"):
        return config.get_text_config()
    return getattr(config, "text_config", None) or config


def image_token_id_of(config: PretrainedConfig) -> int | None:
    for name in IMAGE_TOKEN_ATTRIBUTES:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


@dataclass(frozen=True)
class TextShape:
    """Widths the HIVE blocks take from the language model."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float


def config_value(config: PretrainedConfig, name: str):
    """`config.<name>`, or None. A heterogeneous config (Gemma 4: head sizes differ between sliding and full
    attention layers) refuses a global per-layer value; HIVE's blocks then take the first layer's (they have
    their own attention, the value only sets their default shape)."""
    try:
        return getattr(config, name, None)
    except AttributeError:
        raise
    except Exception:  # transformers' AmbiguousGlobalPerLayerAttributeError
        layers = getattr(config, "per_layer_config", None)
        return getattr(layers[0], name, None) if layers else None


def text_shape_of(text_config: PretrainedConfig, num_layers: int) -> TextShape:
    hidden = text_config.hidden_size
    heads = config_value(text_config, "num_attention_heads")
    kv_heads = config_value(text_config, "num_key_value_heads") or heads
    head_dim = config_value(text_config, "head_dim") or hidden // heads
    eps = config_value(text_config, "rms_norm_eps") or config_value(text_config, "layer_norm_eps") or 1e-5
    return TextShape(num_layers, hidden, heads, kv_heads, head_dim, eps)


@dataclass(frozen=True)
class VisionShape:
    num_layers: int
    hidden_size: int
    patch_size: int
    image_size: int


def vision_shape_of(vision_config: PretrainedConfig) -> VisionShape:
    for name in ("num_hidden_layers", "hidden_size", "patch_size"):
        if not isinstance(getattr(vision_config, name, None), int):
            raise ValueError(
                f"{type(vision_config).__name__} has no integer `{name}`; HIVE needs a ViT-style encoder "
                "(CLIP, SigLIP, SigLIP2, DINOv2, ...) that reports its depth, width and patch size"
            )
    image_size = getattr(vision_config, "image_size", 224)
    if isinstance(image_size, (tuple, list)):
        image_size = image_size[0]
    return VisionShape(
        vision_config.num_hidden_layers, vision_config.hidden_size, vision_config.patch_size, int(image_size)
    )
