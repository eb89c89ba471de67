"""Training-step FLOPs at full scale, counted on the `meta` device (no weights, no GPU), and the
analytic formulas of supplementary §8.1 next to them.

`FlopCounterMode` counts every matmul / attention the step runs (backward included). "Vision" is the
vision tower's own step, counted alone; "LLM side" is everything else: projectors, HIVE blocks, the
LLM and its head.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModel

from hive_adapter import HiveConfig
from hive_adapter.utils.flags import FullFlagParser

from .configs import TEXT_TOKENS, ModelPair
from .models import HIVE_VARIANTS, POOLED_TOKENS, build, set_stage, training_batch, training_step


@dataclass
class StepFlops:
    mode: str
    stage: int
    vision_tokens: int
    text_tokens: int
    total: int
    vision: int

    @property
    def llm_side(self) -> int:
        return self.total - self.vision

    def as_dict(self) -> dict:
        return {**asdict(self), "llm_side": self.llm_side}


def _count(function) -> int:
    with FlopCounterMode(display=False) as counter:
        function()
    return counter.get_total_flops()


_VISION_FLOPS: dict[tuple, int] = {}


def vision_tower_flops(pair: ModelPair, *, stage: int, batch: int, image_size: int | None = None) -> int:
    """The tower's forward (all hidden states), plus its backward when it trains (stage 3).

    The same for every mode, so counted once per (pair, trained or not, batch, image size).
    """
    trains = stage >= 3
    key = (pair.name, trains, batch, image_size)
    if key not in _VISION_FLOPS:
        with torch.device("meta"):
            tower = AutoModel.from_config(pair.vision_config(image_size))
        tower.requires_grad_(trains)
        size = image_size or pair.vision["image_size"]
        pixels = torch.zeros(batch, 3, size, size, device="meta")

        def step():
            states = tower(pixel_values=pixels, output_hidden_states=True).hidden_states
            if trains:
                sum(state.sum() for state in states[1:]).backward()

        _VISION_FLOPS[key] = _count(step)
    return _VISION_FLOPS[key]


def count_step(
    pair: ModelPair,
    mode: str,
    *,
    stage: int,
    batch: int = 1,
    text_tokens: int = TEXT_TOKENS,
    image_size: int | None = None,
) -> StepFlops:
    """FLOPs of one training step of `mode` at `stage` (forward + backward), on `meta`."""
    model = build(pair, mode, device="meta", image_size=image_size)
    set_stage(model, mode, stage)
    inputs = training_batch(pair, mode, batch=batch, text_tokens=text_tokens, device="meta", image_size=image_size)
    total = _count(lambda: training_step(model, inputs))
    vision = 0 if mode == "text" else vision_tower_flops(pair, stage=stage, batch=batch, image_size=image_size)
    return StepFlops(mode, stage, 0 if mode == "text" else pair.vision_tokens(image_size), text_tokens, total, vision)


# ---------------------------------------------------------------------- analytic (forward, one sample)
def llm_forward_flops(pair: ModelPair, tokens: int) -> int:
    """A Llama forward over `tokens`: 2 FLOPs per weight per token, 4*N^2*width for the attention
    products (kernels compute the full N x N product; causality halves only the useful part), LM head."""
    t = pair.text
    d, heads, kv_heads = t["hidden_size"], t["num_attention_heads"], t["num_key_value_heads"]
    head_dim = d // heads
    attention_weights = d * heads * head_dim * 2 + d * kv_heads * head_dim * 2  # q, o + k, v
    mlp_weights = 3 * d * t["intermediate_size"]
    per_layer = 2 * tokens * (attention_weights + mlp_weights) + 4 * tokens * tokens * heads * head_dim
    return t["num_hidden_layers"] * per_layer + 2 * tokens * d * t["vocab_size"]


def hive_forward_flops(
    pair: ModelPair, mode: str, *, text_tokens: int = TEXT_TOKENS, image_size: int | None = None
) -> int:
    """The LLM side of one forward (one sample) for `mode`, counted from the shapes alone."""
    t, v = pair.text, pair.vision
    d = t["hidden_size"]
    heads, kv_heads = t["num_attention_heads"], t["num_key_value_heads"]
    head_dim = d // heads
    vision_tokens = pair.vision_tokens(image_size)
    if mode == "hive_pooled":
        vision_tokens = min(vision_tokens, POOLED_TOKENS)  # pooling itself is not a matmul
    media = min(v["hidden_size"], 2 * kv_heads * head_dim) if mode == "hive_lean" else d  # the projector's output
    if mode == "hive_lean":
        projector = 2 * vision_tokens * v["hidden_size"] * media  # one layer
    else:
        projector = 2 * vision_tokens * (v["hidden_size"] * d + d * d)  # mlp2x_gelu
    if mode == "text":
        return llm_forward_flops(pair, text_tokens)
    if mode == "concat":
        return projector + llm_forward_flops(pair, text_tokens - 1 + vision_tokens)
    resolved = HiveConfig(connector="hive" if mode in HIVE_VARIANTS else mode, **pair.hive_layers).resolve_layers(
        num_vision_layers=v["num_hidden_layers"], num_llm_layers=t["num_hidden_layers"]
    )
    if mode == "deepstack":  # concat's sequence; one projector per level (the additions are not matmuls)
        return len(resolved.vision_layers) * projector + llm_forward_flops(pair, text_tokens - 1 + vision_tokens)
    block = (
        2 * text_tokens * 2 * d * heads * head_dim  # q, o
        + 2 * vision_tokens * 2 * media * kv_heads * head_dim  # k, v over the level's tokens
        + 4 * text_tokens * vision_tokens * heads * head_dim  # attention products
    )
    return (
        len(resolved.vision_layers) * projector
        + len(resolved.llm_layers) * block
        + llm_forward_flops(pair, text_tokens)
    )


def paper_complexity(
    pair: ModelPair, mode: str, *, text_tokens: int = TEXT_TOKENS, image_size: int | None = None
) -> float:
    """Supplementary eq. (4) and (5) as printed (big-O, no constants): SA L(N^2 d/2 + N d^2), HIVE
    L(L_s d^2 + N_t d^2)."""
    t, v = pair.text, pair.vision
    layers, d = t["num_hidden_layers"], t["hidden_size"]
    if mode in ("concat", "deepstack"):  # self-attention over the spliced sequence
        n = text_tokens + pair.vision_tokens(image_size)
        return layers * (n * n * d / 2 + n * d * d)
    if mode == "text":
        return layers * text_tokens * d * d
    selected = len(
        HiveConfig(connector="hive" if mode in HIVE_VARIANTS else mode, **pair.hive_layers)
        .resolve_layers(num_vision_layers=v["num_hidden_layers"], num_llm_layers=layers)
        .vision_layers
    )
    return layers * (selected * d * d + text_tokens * d * d)


def flops_table(pair: ModelPair, modes: list[str], stages=(1, 2, 3)) -> str:
    """Markdown: each mode's training-step FLOPs at `pair`'s shape (one sample, counted on `meta`) per stage, its
    LLM side over concat's, and the analytic forward of the LLM side."""
    lines = [
        f"Training step, one sample of {TEXT_TOKENS} text tokens and one image ({pair.vision_tokens()} vision tokens), "
        f"{pair.name}; counted on `meta` (forward + backward). LLM side: everything but the vision tower.",
        "",
        "| stage | mode | total TFLOPs | LLM side TFLOPs | LLM side / concat | analytic forward, LLM side TFLOPs |",
        "| ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for stage in stages:
        counted = {mode: count_step(pair, mode, stage=stage) for mode in dict.fromkeys([*modes, "concat"])}
        for mode in modes:
            row = counted[mode]
            lines.append(
                f"| {stage} | {mode} | {row.total / 1e12:.3f} | {row.llm_side / 1e12:.3f} | "
                f"{row.llm_side / counted['concat'].llm_side:.3f} | {hive_forward_flops(pair, mode) / 1e12:.3f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    from pathlib import Path

    from .configs import PAPER_1B, PAPER_7B
    from .models import MODES

    parser = FullFlagParser(description="Training-step FLOPs of the compared modes at a paper shape.")
    parser.add_argument("--pair", choices=("1B", "7B"), default="1B")
    parser.add_argument("--modes", default="hive,cascaded,concat,deepstack", help="comma-separated modes")
    parser.add_argument("--output", type=Path, default=None, help="also write the table to this .md file")
    args = parser.parse_args(argv)
    modes = [mode for mode in args.modes.split(",") if mode]
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown or not modes:
        parser.error(f"--modes {args.modes!r}: choose from {','.join(MODES)}")
    table = flops_table({"1B": PAPER_1B, "7B": PAPER_7B}[args.pair], modes)
    if args.output is not None:
        args.output.write_text(f"# FLOPs at the {args.pair} shape\n\nCommand: `python -m benchmarks.flops --pair "
                               f"{args.pair} --modes {args.modes}`.\n\n{table}")  # fmt: skip
    print(table)


if __name__ == "__main__":
    main()
