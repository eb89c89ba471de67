"""Packed vs padded training steps, HIVE and concat, on two length distributions (issue 29).

    python -m benchmarks.packing [--batch 32] [--rounds 3] [--out benchmarks/results/packing]

For each distribution one batch of samples is drawn (seeded) and trained on four ways: HIVE padded (one sample
per row, padded to the longest), HIVE packed (`hive_adapter.data.collator.pack_rows`: first-fit decreasing into
rows of `--packing_length` tokens, position ids restarting per sample, no attention mask), concat padded and
concat packed (its image tokens inside each sample). Measured with the real CPU kernels on a small pair (the
modes interleaved round after round, median step): padding share of the LLM's sequence positions and text tokens
per second; counted on `meta` at the 1B shape: FLOPs of the same steps (dense kernels: a packed row costs its full
width, its mask does not change the count).

The length distributions are written down here, not read from the data sets (no download on the benchmark
machine); they follow the published statistics of LLaVA's data:

- short captions (LLaVA-558k, stage 1): BLIP captions of ~10-15 words behind a short "describe" instruction:
  BOS + marker + prompt + caption + EOS of 24 tokens typical, log-normal (sigma 0.35), clipped to [8, 77];
- mixed-length conversations (LLaVA-Instruct-150k, stage 2): from one short question and answer to long
  multi-turn dialogues: 180 tokens typical, log-normal (sigma 0.7), clipped to [16, 512] (the CPU run's maximum).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import hive_adapter
from hive_adapter.data.collator import pack_rows
from hive_adapter.model.splice import IGNORE_INDEX
from hive_adapter.utils.flags import FullFlagParser

from .configs import CPU_SMALL, IMAGE_TOKEN_ID, PAPER_1B, ModelPair
from .flops import vision_tower_flops
from .models import build, set_stage


@dataclass(frozen=True)
class Distribution:
    name: str
    typical: int  # the log-normal's median, tokens
    sigma: float
    low: int
    high: int  # also the max_text_length of the run
    stage: int  # the stage such data trains

    def lengths(self, count: int, seed: int) -> list[int]:
        generator = torch.Generator().manual_seed(seed)
        normal = torch.randn(count, generator=generator, dtype=torch.float64)
        raw = torch.exp(math.log(self.typical) + self.sigma * normal)
        return [int(min(max(round(float(x)), self.low), self.high)) for x in raw]


DISTRIBUTIONS = {
    "short captions (LLaVA-558k-like)": Distribution("captions", 24, 0.35, 8, 77, stage=1),
    "mixed-length conversations (LLaVA-Instruct-like)": Distribution("conversations", 180, 0.7, 16, 512, stage=2),
}
MODES = ("hive", "concat")


def encoded_samples(lengths: list[int], vocab: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) per sample: BOS, the image marker, text; labels on the text after a 1/4 prompt."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for length in lengths:
        ids = [1, IMAGE_TOKEN_ID, *torch.randint(8, vocab, (length - 2,), generator=generator).tolist()]
        prompt = 2 + (length - 2) // 4
        out.append((ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return out


def padded_batch(encoded) -> dict:
    width = max(len(ids) for ids, _ in encoded)
    batch = {
        "input_ids": torch.zeros(len(encoded), width, dtype=torch.long),
        "labels": torch.full((len(encoded), width), IGNORE_INDEX),
        "attention_mask": torch.zeros(len(encoded), width, dtype=torch.long),
    }
    for row, (ids, labels) in enumerate(encoded):
        batch["input_ids"][row, : len(ids)] = torch.tensor(ids)
        batch["labels"][row, : len(ids)] = torch.tensor(labels)
        batch["attention_mask"][row, : len(ids)] = 1
    return batch


def batches(encoded, *, packing_length: int, pixels: torch.Tensor) -> dict[str, dict]:
    """The same samples padded and packed, each with its images in its sample order."""
    packed, order = pack_rows(encoded, capacity=packing_length, pad_token_id=0)
    return {
        "padded": {**padded_batch(encoded), "pixel_values": pixels},
        "packed": {**packed, "pixel_values": pixels[order]},
    }


def sequence_positions(batch: dict, mode: str, vision_tokens: int) -> int:
    """Positions the LLM computes: rows x width (concat: each marker replaced by the image's tokens)."""
    rows, width = batch["input_ids"].shape
    if mode != "concat":
        return rows * width
    if "attention_mask" in batch:  # padded: every row as long as the longest spliced sample
        return rows * (width - 1 + vision_tokens)
    images = (batch["input_ids"] == IMAGE_TOKEN_ID).sum(dim=1)
    return rows * int((width + images * (vision_tokens - 1)).max())


def text_tokens(encoded) -> int:
    return sum(len(ids) - 1 for ids, _ in encoded)  # the marker is not text


def padding_share(encoded, batch: dict, mode: str, vision_tokens: int) -> float:
    real = text_tokens(encoded) + (len(encoded) * vision_tokens if mode == "concat" else 0)
    return 1 - real / sequence_positions(batch, mode, vision_tokens)


def step(model, batch: dict) -> None:
    loss = model(**batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)


def cpu_times(
    pair: ModelPair, stage: int, inputs: dict[str, dict], rounds: int, image_size: int
) -> dict[str, list[float]]:
    """Median-able step times of every (mode, layout), interleaved round after round after one warm-up."""
    models = {}
    for mode in MODES:
        torch.manual_seed(0)
        models[mode] = build(pair, mode, device="cpu", image_size=image_size).train()
        set_stage(models[mode], mode, stage)
    times: dict[str, list[float]] = {f"{m} {layout}": [] for m in MODES for layout in inputs}
    times["vision tower"] = []  # its forward alone (frozen in stages 1-2), the share no layout changes
    pixels = inputs["padded"]["pixel_values"]
    for round_number in range(rounds + 1):
        start = time.perf_counter()
        with torch.no_grad():
            models["hive"].vision_model(pixel_values=pixels, output_hidden_states=True)
        if round_number:
            times["vision tower"].append(time.perf_counter() - start)
        for mode, model in models.items():
            for layout, batch in inputs.items():
                start = time.perf_counter()
                step(model, batch)
                if round_number:  # round 0 warms up
                    times[f"{mode} {layout}"].append(time.perf_counter() - start)
    return times


_ROW_FLOPS: dict[tuple, int] = {}


def meta_flops(pair: ModelPair, mode: str, stage: int, batch: dict) -> int:
    """FLOPs of one training step on `meta`, row by row (each row with its own images; a ready 4-D causal mask
    of the row's length, as transformers' mask builder needs values `meta` lacks). Rows of one width and image
    count cost the same: each such row is counted once."""
    size = pair.vision["image_size"]
    total = 0
    for row in range(batch["input_ids"].shape[0]):
        ids = batch["input_ids"][row : row + 1]
        images = int((ids == IMAGE_TOKEN_ID).sum())
        key = (pair.name, mode, stage, ids.shape[1], images)
        if key not in _ROW_FLOPS:
            model = build(pair, mode, device="meta").train()
            set_stage(model, mode, stage)
            length = ids.shape[1] + (images * (pair.vision_tokens() - 1) if mode == "concat" else 0)
            inputs = {
                "input_ids": ids.to("meta"),
                "labels": batch["labels"][row : row + 1].to("meta"),
                "pixel_values": torch.zeros(images, 3, size, size, device="meta"),
                "attention_mask": torch.ones(1, 1, length, length, dtype=torch.bool, device="meta").tril(),
            }
            with FlopCounterMode(display=False) as counter:
                step(model, inputs)
            _ROW_FLOPS[key] = counter.get_total_flops()
        total += _ROW_FLOPS[key]
    return total


def run(
    batch: int,
    rounds: int,
    packing_factor: int,
    seed: int,
    flops: bool,
    image_size: int,
    *,
    pair: ModelPair = CPU_SMALL,
    flops_pair: ModelPair = PAPER_1B,
    distributions: dict[str, Distribution] = DISTRIBUTIONS,
) -> dict:
    results = {}
    vision_tokens = pair.vision_tokens(image_size)
    for title, dist in distributions.items():
        lengths = dist.lengths(batch, seed)
        encoded = encoded_samples(lengths, pair.text["vocab_size"], seed)
        pixels = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))
        packing_length = dist.high * packing_factor
        inputs = batches(encoded, packing_length=packing_length, pixels=pixels)
        times = cpu_times(pair, dist.stage, inputs, rounds, image_size)
        tokens = text_tokens(encoded)
        entry = {
            "stage": dist.stage,
            "image_size": image_size,
            "vision_tokens": vision_tokens,
            "samples": batch,
            "lengths": {"mean": statistics.mean(lengths), "min": min(lengths), "max": max(lengths)},
            "text_tokens": tokens,
            "packing_length": packing_length,
            "rows": {layout: tuple(b["input_ids"].shape) for layout, b in inputs.items()},
            "modes": {},
        }
        tower = times.pop("vision tower")
        entry["vision_tower_s"] = statistics.median(tower)
        for key, samples in times.items():
            mode, layout = key.split()
            median = statistics.median(samples)
            entry["modes"][key] = {
                "padding_share": padding_share(encoded, inputs[layout], mode, vision_tokens),
                "step_s": median,
                "step_s_all": samples,
                "text_tokens_per_s": tokens / median,
                # the step without the tower's forward: what the layout can change
                "text_tokens_per_s_without_tower": tokens / max(median - entry["vision_tower_s"], 1e-9),
            }
        for mode in MODES:
            padded, packed = entry["modes"][f"{mode} padded"], entry["modes"][f"{mode} packed"]
            entry[f"{mode} packed / padded tokens/s"] = packed["text_tokens_per_s"] / padded["text_tokens_per_s"]
            entry[f"{mode} packed / padded tokens/s without the tower"] = (
                packed["text_tokens_per_s_without_tower"] / padded["text_tokens_per_s_without_tower"]
            )
        entry["hive packed / concat packed tokens/s"] = (
            entry["modes"]["hive packed"]["text_tokens_per_s"] / entry["modes"]["concat packed"]["text_tokens_per_s"]
        )
        if flops:  # the same samples at the 1B shape (the text lengths as drawn; images at 384)
            meta_inputs = batches(encoded, packing_length=packing_length, pixels=pixels[:, :, :1, :1])
            entry["flops_1b"] = {
                f"{mode} {layout}": meta_flops(flops_pair, mode, dist.stage, meta_inputs[layout])
                for mode in MODES
                for layout in meta_inputs
            }
            entry["flops_1b_vision_tower"] = vision_tower_flops(flops_pair, stage=dist.stage, batch=batch)
        results[title] = entry
    return results


def environment(threads: int) -> dict:
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": platform.machine(),
        "processor": platform.processor() or "unknown",
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "hive_adapter": hive_adapter.__version__,
        "load_average_at_start": os.getloadavg(),  # 1, 5, 15 min: other work on the machine
    }


def markdown(results: dict, env: dict, args: argparse.Namespace) -> str:
    lines = [
        "# Packed vs padded training steps (issue 29)",
        "",
        f"`python -m benchmarks.packing --batch {args.batch} --rounds {args.rounds} --packing_factor "
        f"{args.packing_factor} --image_size {args.image_size}` on {env['date']}: {env['machine']} ({env['processor']}), {env['cpu_count']} cores, "
        f"{env['torch_threads']} torch threads; torch {env['torch']}, transformers {env['transformers']}.",
        "",
        f"**Contended timings**: {args.note}. Load average (1, 5, 15 min) at the start "
        f"{', '.join(f'{x:.1f}' for x in env['load_average_at_start'])}, at the end "
        f"{', '.join(f'{x:.1f}' for x in env['load_average_at_end'])}; {env['wall_s']} s in all. The modes run "
        "interleaved, round after round, so the ratios are fairer than the absolute times.",
        "",
        f"CPU pair: {CPU_SMALL.name}, real kernels (SDPA; packed rows masked block-diagonally by transformers from "
        "their position ids), float32, one training step (forward + backward) of the stage such data trains, "
        "median over the rounds. Text tokens: every sample's tokens but its image marker. Padding share: the LLM's "
        "sequence positions that hold no sample token (concat: its image tokens count as real).",
        "",
    ]
    for title, entry in results.items():
        lines += [
            f"## {title}",
            "",
            f"{entry['samples']} samples with a {entry['image_size']}px image each ({entry['vision_tokens']} patches), "
            f"lengths mean {entry['lengths']['mean']:.1f} (min {entry['lengths']['min']}, "
            f"max {entry['lengths']['max']}), {entry['text_tokens']} text tokens, stage {entry['stage']}; padded "
            f"rows {entry['rows']['padded']}, packed rows {entry['rows']['packed']} (packing length "
            f"{entry['packing_length']}).",
            "",
            f"The vision tower's forward alone (the same {entry['samples']} images either way): "
            f"{entry['vision_tower_s']:.3f} s.",
            "",
            "| mode | padding share | step (s) | text tokens/s | text tokens/s, step less the tower |"
            + (" FLOPs at 1B |" if "flops_1b" in entry else ""),
            "| --- | ---: | ---: | ---: | ---: |" + (" ---: |" if "flops_1b" in entry else ""),
        ]
        for key, values in entry["modes"].items():
            flops = f" {entry['flops_1b'][key] / 1e12:.1f} T |" if "flops_1b" in entry else ""
            lines.append(
                f"| {key} | {values['padding_share']:.1%} | {values['step_s']:.3f} | "
                f"{values['text_tokens_per_s']:.0f} | {values['text_tokens_per_s_without_tower']:.0f} |{flops}"
            )
        if "flops_1b" in entry:
            tower = entry["flops_1b_vision_tower"]
            hive = entry["flops_1b"]["hive padded"] - tower, entry["flops_1b"]["hive packed"] - tower
            lines += [
                "",
                f"FLOPs at 1B: the vision tower's share is {tower / 1e12:.1f} T of each HIVE step; HIVE's LLM side "
                f"(projectors, blocks, LLM) {hive[0] / 1e12:.1f} T padded vs {hive[1] / 1e12:.1f} T packed "
                f"({hive[1] / hive[0]:.2f}x).",
            ]
        lines += [
            "",
            f"HIVE packed / padded: **{entry['hive packed / padded tokens/s']:.2f}x** text tokens/s "
            f"({entry['hive packed / padded tokens/s without the tower']:.2f}x without the tower's share); concat "
            f"packed / padded: {entry['concat packed / padded tokens/s']:.2f}x "
            f"({entry['concat packed / padded tokens/s without the tower']:.2f}x); HIVE packed / concat packed: "
            f"{entry['hive packed / concat packed tokens/s']:.2f}x.",
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = FullFlagParser(prog="python -m benchmarks.packing", description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32, help="samples per step (both layouts)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up")
    parser.add_argument("--packing_factor", type=int, default=1, help="packing length = max length x this")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image_size", type=int, default=CPU_SMALL.vision["image_size"], help="the CPU pair's images")
    parser.add_argument("--no_flops", action="store_true", help="skip the FLOP count at the 1B shape")
    parser.add_argument("--note", default="none given", help="what else ran on the machine meanwhile")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/packing"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    env = environment(args.threads)
    started = time.perf_counter()
    results = run(args.batch, args.rounds, args.packing_factor, args.seed, not args.no_flops, args.image_size)
    env["load_average_at_end"] = os.getloadavg()
    env["wall_s"] = round(time.perf_counter() - started)
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"environment": env, "arguments": {k: str(v) for k, v in vars(args).items()}, "results": results}
    (args.out / "packing.json").write_text(json.dumps(record, indent=1))
    (args.out / "packing.md").write_text(markdown(results, env, args))
    print(markdown(results, env, args))


if __name__ == "__main__":
    main()
