"""The VLM families HIVE wraps, at their real published sizes, on `meta` (no weights, no hub): issue 37 item 6.

    python -m benchmarks.family_sizes            # writes benchmarks/results/families/real_sizes.{json,md}

For each family: its published config (typed in, benchmarks/family_size_configs.py, which names each value's
source), the family's transformers class built on `meta`, wrapped with `get_hive_model`. Recorded: the wrap, the
default vision levels and decoder depths HIVE picks, HIVE's parameter count, and the FLOPs of HIVE vs the family's
own connector for one typical image.

FLOPs: counted by `benchmarks.flops`'s counter (torch's `FlopCounterMode`, on `meta`), **LLM side, one forward, one
sample, `TEXT_TOKENS` (77) text tokens**; the vision tower itself is the same for both and left out.
- family's own connector: its projector (Qwen's merger + Qwen3-VL's DeepStack mergers, LLaVA's MLP, Idefics3's
  pixel-shuffle connector, Gemma 4's norm + linear over its pooled soft tokens, ...) over the image's encoder
  features, then the decoder over 77 + N positions, N the positions the image takes in the sequence;
- HIVE (its defaults: ~25% of the encoder layers, mlp2x_gelu projectors, all patches as keys): one projector per level
  over the image's K encoder patches (every crop of the image), one gated cross-attention block per chosen depth
  (77 queries x K keys), then the decoder over the 77 text positions;
- both: the LM head over the 77 text positions.
Parameter counts are checked against the model card's figure (`published_parameters`): a typo in a config shows.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers

from hive_adapter import get_hive_model
from hive_adapter.utils.console import say
from hive_adapter.utils.flags import FullFlagParser

from .configs import TEXT_TOKENS
from .family_size_configs import FAMILIES, NOT_MEASURED, FamilySize
from .flops import _count

OUTPUT = Path(__file__).parent / "results" / "families"


def build_on_meta(family: FamilySize) -> torch.nn.Module:
    config = getattr(transformers, family.config_class)(**family.config)
    with torch.device("meta"):
        return getattr(transformers, family.model_class)(config)


def wrap_on_meta(base: torch.nn.Module):
    """`get_hive_model(base)` with HIVE's own modules created on `meta` too (outside this context they are made and
    initialised on the CPU, then moved to the base's device: seconds and gigabytes at these sizes)."""
    with torch.device("meta"):
        return get_hive_model(base)


def _meta(*shape: int) -> torch.Tensor:
    return torch.empty(*shape, device="meta")


def decoder_flops(base: torch.nn.Module, positions: int, text_tokens: int) -> int:
    """The decoder over `positions` (embeddings given) and the LM head over the text tokens, one sample."""
    decoder = base.get_decoder()
    text_config = base.config.get_text_config()
    width = text_config.hidden_size
    extra = {}
    if getattr(text_config, "hidden_size_per_layer_input", 0):
        # Gemma 4's per-layer embeddings: a lookup by token id (no FLOPs), given here as the decoder cannot invert
        # `inputs_embeds` on meta; their projection from the embeddings is counted.
        per_layer = (text_config.num_hidden_layers, text_config.hidden_size_per_layer_input)
        extra["per_layer_inputs"] = _meta(1, positions, *per_layer)

    def run():
        # A ready 4-D causal mask, as benchmarks.models does on meta: transformers' mask builder reads values.
        mask = torch.ones(1, 1, positions, positions, dtype=torch.bool, device="meta").tril()
        decoder(inputs_embeds=_meta(1, positions, width), attention_mask=mask, use_cache=False, **extra)
        base.lm_head(_meta(1, text_tokens, width))

    return _count(run)


def family_connector_flops(base: torch.nn.Module, family: FamilySize) -> int:
    """The family's own projector over one image's encoder features (the shapes its forward gives it)."""
    inner = base.model
    kind, shape = family.projector_kind, family.projector_input
    if kind == "qwen_merger":  # (patches, vision width) in merge-block order -> (patches / 4, text width)
        mergers = [inner.visual.merger, *getattr(inner.visual, "deepstack_merger_list", [])]
        return _count(lambda: [merger(_meta(*shape)) for merger in mergers])
    if kind == "pixtral":  # patch merger (2x2) on the image's grid, then the MLP
        side = family.image_pixels // base.config.vision_config.patch_size
        sizes = torch.tensor([[family.image_pixels, family.image_pixels]])
        return _count(lambda: inner.multi_modal_projector(_meta(side * side, shape[-1]), sizes))
    if kind == "internvl":  # pixel shuffle is a reshape; the MLP reads (tiles, 256, 4 x vision width)
        return _count(lambda: inner.multi_modal_projector(_meta(*shape)))
    # "tokens": LLaVA-style projector; "connector": Idefics3's; "embed_vision": Gemma 4's norm + linear over the
    # pooled soft tokens (the 3x3 pooling is in its vision tower)
    module = {"connector": "connector", "embed_vision": "embed_vision"}.get(kind, "multi_modal_projector")
    return _count(lambda: getattr(inner, module)(_meta(*shape)))


def hive_module_flops(model, keys: int, text_tokens: int) -> int:
    """HIVE's projectors over the image's keys (one per level) and its blocks (77 queries each), one sample."""
    vision_width = model.hive_vision_shape.hidden_size
    text_width = model.hive_text_shape.hidden_size
    levels = model.hive_levels

    def run():
        media = [projector(_meta(1, keys, vision_width)) for projector in levels.projectors]
        visible = torch.ones(1, text_tokens, keys, dtype=torch.bool, device="meta")
        has_media = torch.ones(1, text_tokens, dtype=torch.bool, device="meta")
        for index, block in enumerate(model.hive_blocks.values()):
            level = media[min(index, len(media) - 1)]
            block(_meta(1, text_tokens, text_width), level, visible, has_media, all_visible=True)

    return _count(run)


def measure(family: FamilySize, text_tokens: int = TEXT_TOKENS) -> dict:
    base = build_on_meta(family).eval()
    base_parameters = sum(p.numel() for p in base.parameters())
    own_projector = family_connector_flops(base, family)
    own_decoder = decoder_flops(base, text_tokens + family.image_positions, text_tokens)
    text_decoder = decoder_flops(base, text_tokens, text_tokens)
    model = wrap_on_meta(base)
    layers = model.hive_layers
    hive_parameters = sum(p.numel() for _, p in model.hive_named_parameters())
    hive_modules = hive_module_flops(model, family.hive_keys, text_tokens)
    family_total = own_projector + own_decoder
    hive_total = hive_modules + text_decoder
    return {
        "family": family.name,
        "checkpoint": family.checkpoint,
        "model_class": family.model_class,
        "wraps": True,
        "reader": model.hive_vision.reader.name,
        "base_parameters": base_parameters,
        "published_parameters": family.published_parameters,
        "vision_layers": list(layers.vision_layers),
        "llm_layers": list(layers.llm_layers),
        "num_vision_layers": family.num_vision_layers,
        "num_llm_layers": base.config.get_text_config().num_hidden_layers,
        "hive_parameters": hive_parameters,
        "image": family.image,
        "image_positions": family.image_positions,
        "hive_keys": family.hive_keys,
        "text_tokens": text_tokens,
        "family_connector_flops": own_projector,
        "family_llm_side_flops": family_total,
        "hive_module_flops": hive_modules,
        "hive_llm_side_flops": hive_total,
        "text_only_flops": text_decoder,
        "hive_over_family": hive_total / family_total,
        "source": family.source,
    }


def render_markdown(rows: list[dict], skipped: dict[str, str]) -> str:
    lines = [
        "# The VLM families at their real sizes, on `meta` (issue 37)",
        "",
        "Written by `python -m benchmarks.family_sizes`. Each family's published config, built on `meta` (no "
        "weights) and wrapped with `get_hive_model` (defaults). FLOPs: torch's `FlopCounterMode` "
        "(`benchmarks/flops.py`), **LLM side of one forward, one sample, "
        f"{rows[0]['text_tokens'] if rows else TEXT_TOKENS} text tokens, one typical image**; the vision tower "
        "(the same for both) left out. Family = its own projector + the decoder over text + the image's positions; "
        "HIVE = its level projectors over the image's encoder patches + its cross-attention blocks + the decoder "
        "over the text alone. Both include the LM head over the text. GFLOPs = 1e9 FLOPs (a multiply-add is 2).",
        "",
        "| family | checkpoint | params (card) | vision levels -> decoder layers | HIVE params | image | image "
        "positions (family) | HIVE keys | family GFLOPs | HIVE GFLOPs | HIVE / family |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['family']} | {row['checkpoint']} | {row['base_parameters'] / 1e9:.2f}B "
            f"({row['published_parameters']}) | {tuple(row['vision_layers'])} of {row['num_vision_layers']} -> "
            f"{tuple(row['llm_layers'])} of {row['num_llm_layers']} | {row['hive_parameters'] / 1e6:.0f}M | "
            f"{row['image']} | {row['image_positions']} | {row['hive_keys']} | "
            f"{row['family_llm_side_flops'] / 1e9:.0f} | {row['hive_llm_side_flops'] / 1e9:.0f} | "
            f"{row['hive_over_family']:.2f} |"
        )
    lines += [
        "",
        "Where the config values come from (no hub access; stored public material, benchmarks/family_size_configs.py;"
        " each parameter count also checked against the model card's figure):",
        "",
    ]
    lines += [f"- {row['family']}: {row['source']}" for row in rows]
    for name, reason in skipped.items():
        lines += ["", f"Not measured: {name}: {reason}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = FullFlagParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", type=Path, default=OUTPUT)
    parser.add_argument("--families", nargs="*", default=None, help="family names (default: all)")
    args = parser.parse_args(argv)
    unknown = set(args.families or ()) - {family.name for family in FAMILIES}
    if unknown:
        raise SystemExit(f"--families {sorted(unknown)}: unknown; known: {[family.name for family in FAMILIES]}")
    if args.output_dir.exists() and not args.output_dir.is_dir():
        raise SystemExit(f"--output_dir {args.output_dir}: is a file; give a directory")
    rows, skipped = [], {} if args.families else dict(NOT_MEASURED)
    for family in FAMILIES:
        if args.families and family.name not in args.families:
            continue
        if not hasattr(transformers, family.config_class):
            skipped[family.name] = f"transformers {transformers.__version__} has no {family.config_class}"
            continue
        row = measure(family)
        say("family_sizes", f"{family.name}: levels {row['vision_layers']} -> layers {row['llm_layers']}, HIVE "
            f"{row['hive_parameters'] / 1e6:.0f}M params, LLM-side GFLOPs family "
            f"{row['family_llm_side_flops'] / 1e9:.0f} vs HIVE {row['hive_llm_side_flops'] / 1e9:.0f}")  # fmt: skip
        rows.append(row)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "real_sizes.json").write_text(json.dumps({"rows": rows, "skipped": skipped}, indent=1) + "\n")
    (args.output_dir / "real_sizes.md").write_text(render_markdown(rows, skipped))
    say("family_sizes", f"wrote {args.output_dir / 'real_sizes.md'}")


if __name__ == "__main__":
    main()
