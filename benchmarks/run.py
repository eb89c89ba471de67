"""`python -m benchmarks.run --suite cpu|gpu|all`: every figure of the comparison, in one run.

Writes `benchmarks/results/<suite>.json` (all numbers, machine and versions), `<suite>.md` (the tables
the README shows) and PNG plots next to them.

- cpu: FLOPs of a training step at the paper's 1B and 7B shapes for each stage (counted on `meta`,
  next to the analytic forward counts and the §8.1 formulas), activation bytes saved for backward at
  those shapes, peak training memory as the paper reports it (`benchmarks.memory`), FLOP scaling in
  vision and text tokens; step time at the 1B widths with 2 + 2 layers; on a CPU-sized pair: step time,
  step time against vision tokens, generation cost.
- gpu: `benchmarks.gpu_check` (kernel checks, then bf16 step time and peak CUDA memory at the 1B shape, flash vs SDPA); needs a CUDA device.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from hive_adapter.utils.console import on_a_terminal, progress
from hive_adapter.utils.flags import FullFlagParser

from . import gpu_check
from .configs import CPU_SMALL, PAPER_1B, PAPER_1B_SHALLOW, PAPER_7B, TEXT_TOKENS, ModelPair
from .flops import count_step, hive_forward_flops, paper_complexity
from .measure import generation_costs, saved_activation_bytes, step_times
from .memory import training_memory
from .models import MODES

RESULTS = Path(__file__).resolve().parent / "results"
PAIRS = {"1B": PAPER_1B, "7B": PAPER_7B}
VISION_SWEEP = (112, 224, 336, 448, 672)  # patch 14: 64, 256, 576, 1024, 2304 vision tokens
TEXT_SWEEP = (32, 77, 256, 512, 1024)
CPU_VISION_SWEEP = (112, 224, 336, 448)
TARGETS = {"flops": 0.14, "activation": 0.41, "overhead": 1.15}
LEAN_TARGETS = {"flops_1B": 0.11, "overhead_1B": 1.2, "flops_7B": 0.13}  # the lean projector's (issue 19)
MEMORY_MODES = ("hive", "hive_pooled", "hive_lean", "concat", "text")
MEMORY_BATCHES = (1, 16)  # per-device batch of the memory tables
PAPER_MEMORY = {"Table 9 (peak GB)": 22.03 / 54.2, "Table 6 (memory overhead)": 0.8}


def phase(items, description: str):
    """A progress bar on a terminal; elsewhere one line saying what is being measured."""
    if not on_a_terminal():
        print(f"[benchmarks] {description}...", flush=True)
    return progress(items, description=description)


def environment() -> dict:
    import transformers

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or "unknown",
        "cpu_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


# ---------------------------------------------------------------------- cpu suite
def flops_tables(pairs: dict[str, ModelPair], stages=(1, 2, 3)) -> dict:
    out = {}
    jobs = [(name, stage, mode) for name in pairs for stage in stages for mode in MODES]
    for name, stage, mode in phase(jobs, "FLOPs (meta)"):
        pair = pairs[name]
        counted = count_step(pair, mode, stage=stage).as_dict()
        counted["analytic_llm_forward"] = hive_forward_flops(pair, mode)
        counted["paper_complexity"] = paper_complexity(pair, mode)
        out.setdefault(name, {}).setdefault(str(stage), {})[mode] = counted
    return out


def activation_tables(pairs: dict[str, ModelPair], stages=(1, 2)) -> dict:
    jobs = [(name, stage, mode) for name in pairs for stage in stages for mode in MODES]
    out = {}
    for name, stage, mode in phase(jobs, "activation bytes (meta)"):
        out.setdefault(name, {}).setdefault(str(stage), {})[mode] = saved_activation_bytes(
            pairs[name], mode, stage=stage
        )
    return out


def memory_tables(pairs: dict[str, ModelPair], stages=(1, 2, 3)) -> dict:
    jobs = [(name, stage, mode) for name in pairs for stage in stages for mode in MEMORY_MODES]
    out = {}
    for name, stage, mode in phase(jobs, "training memory (meta)"):
        memory = training_memory(pairs[name], mode, stage=stage)
        out.setdefault(name, {}).setdefault(str(stage), {})[mode] = memory.as_dict(MEMORY_BATCHES)
    return out


def scaling(pair: ModelPair) -> dict:
    modes = ("hive", "hive_pooled", "cascaded", "concat", "text")
    vision = {mode: [] for mode in modes}
    for size in phase(VISION_SWEEP, "FLOPs vs vision tokens"):
        for mode in modes:
            vision[mode].append(count_step(pair, mode, stage=2, image_size=size).llm_side)
    text = {mode: [] for mode in modes}
    for tokens in phase(TEXT_SWEEP, "FLOPs vs text tokens"):
        for mode in modes:
            text[mode].append(count_step(pair, mode, stage=2, text_tokens=tokens).llm_side)
    return {
        "vision_tokens": [pair.vision_tokens(size) for size in VISION_SWEEP],
        "llm_side_flops_by_vision_tokens": vision,
        "text_tokens": list(TEXT_SWEEP),
        "llm_side_flops_by_text_tokens": text,
    }


def cpu_time_scaling(pair: ModelPair, rounds: int) -> dict:
    out = {"vision_tokens": [pair.vision_tokens(size) for size in CPU_VISION_SWEEP], "median_s": {}}
    for size in phase(CPU_VISION_SWEEP, "CPU step time vs vision tokens"):
        times = step_times(pair, ["hive", "concat"], stage=2, batch=1, rounds=rounds, image_size=size)
        for mode, value in times.items():
            out["median_s"].setdefault(mode, []).append(value["median_s"])
    return out


def run_cpu(rounds: int) -> dict:
    results = {"suite": "cpu", "environment": environment(), "text_tokens": TEXT_TOKENS}
    results["pairs"] = {name: pair.name for name, pair in PAIRS.items()} | {"cpu": CPU_SMALL.name}
    results["flops"] = flops_tables(PAIRS)
    results["activation_bytes"] = activation_tables(PAIRS)
    results["activation_bytes_cpu_small"] = {
        mode: saved_activation_bytes(CPU_SMALL, mode, stage=2, device="cpu")
        for mode in phase(MODES, "activation bytes (CPU)")
    }
    results["training_memory"] = memory_tables(PAIRS)
    results["scaling_1B"] = scaling(PAPER_1B)
    print("timing a training step at the 1B widths, 2 + 2 layers (interleaved rounds)...", flush=True)
    results["pairs"]["1B_shallow"] = PAPER_1B_SHALLOW.name
    results["step_time_1B_widths"] = step_times(
        PAPER_1B_SHALLOW, ["hive", "hive_pooled", "hive_lean", "concat", "text"], stage=2, batch=1, rounds=rounds
    )
    print("timing a training step on CPU (interleaved rounds)...", flush=True)
    results["cpu_step_time"] = step_times(CPU_SMALL, list(MODES), stage=2, batch=2, rounds=rounds)
    results["cpu_time_scaling"] = cpu_time_scaling(CPU_SMALL, rounds=max(2, rounds // 2))
    results["generation"] = {
        mode: generation_costs(CPU_SMALL, mode) for mode in phase(("hive", "concat"), "generation")
    }
    return results


# ---------------------------------------------------------------------- gpu suite
def run_gpu(rounds: int) -> dict:
    return {"suite": "gpu", **gpu_check.run(dry_run=False, pair="1B", batch=8, rounds=rounds)}


# ---------------------------------------------------------------------- reporting
def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


HEADLINE_MODES = ("hive", "hive_pooled", "hive_lean")


def headline(results: dict) -> list[tuple[str, dict[str, float], str]]:
    """(ratio with its scope, value per HIVE variant, target or the paper's figure), at stage 2."""
    flops, flops_7b = results["flops"]["1B"]["2"], results["flops"]["7B"]["2"]
    activation = results["activation_bytes"]["1B"]["2"]
    memory = results["training_memory"]["1B"]["2"]
    batch = str(MEMORY_BATCHES[-1])
    widths, small = results["step_time_1B_widths"], results["cpu_step_time"]

    def per_mode(value) -> dict[str, float]:
        return {mode: value(mode) for mode in HEADLINE_MODES}

    lean = LEAN_TARGETS
    return [
        ("training FLOPs / concat, LLM side, 1B",
         per_mode(lambda m: ratio(flops[m]["llm_side"], flops["concat"]["llm_side"])),
         f"<= {TARGETS['flops']} (paper 0.14); lean <= {lean['flops_1B']}"),
        ("training FLOPs / concat, end to end (vision tower included), 1B",
         per_mode(lambda m: ratio(flops[m]["total"], flops["concat"]["total"])), "measured"),
        ("training FLOPs / concat, LLM side, 7B",
         per_mode(lambda m: ratio(flops_7b[m]["llm_side"], flops_7b["concat"]["llm_side"])),
         f"lean <= {lean['flops_7B']}"),
        ("training FLOPs / text-only, LLM side, 1B",
         per_mode(lambda m: ratio(flops[m]["llm_side"], flops["text"]["llm_side"])),
         f"<= {TARGETS['overhead']}; lean <= {lean['overhead_1B']}"),
        ("activation bytes saved for backward / concat, 1B (meta)",
         per_mode(lambda m: ratio(activation[m], activation["concat"])), f"<= {TARGETS['activation']}"),
        (f"peak training memory / concat (bf16 AdamW model, batch {batch}), 1B",
         per_mode(lambda m: ratio(memory[m]["peak_bytes"][batch], memory["concat"]["peak_bytes"][batch])),
         f"paper Table 9: {PAPER_MEMORY['Table 9 (peak GB)']:.3f}, Table 6: 0.8"),
        ("step time / concat, 1B widths with 2 + 2 layers, CPU",
         per_mode(lambda m: ratio(widths[m]["median_s"], widths["concat"]["median_s"])),
         "paper (GPU, full depth): 1/3.43 = 0.29"),
        ("step time / concat, CPU-small pair",
         per_mode(lambda m: ratio(small[m]["median_s"], small["concat"]["median_s"])), "measured"),
    ]  # fmt: skip


def memory_note() -> str:
    from .memory import OPTIMIZER_BYTES

    return (
        f"one device, no sharding, bf16 weights and gradients, {OPTIMIZER_BYTES} bytes of fp32 AdamW state per "
        "trainable parameter, plus the bytes saved for backward per sample times the batch; a lower bound on a "
        "measured peak"
    )


def markdown(results: dict) -> str:
    if results["suite"] == "gpu":
        return gpu_check.markdown(results)
    env = results["environment"]
    lines = [
        f"Produced by `python -m benchmarks.run --suite cpu` on {env['date']}: {env['machine']}, "
        f"{env['cpu_threads']} CPU threads, Python {env['python']}, torch {env['torch']}, transformers "
        f"{env['transformers']}. One image and {results['text_tokens']} text tokens per sample.",
        "",
        "**Headline, stage 2 (1B = SigLIP-so400m/14@384 + TinyLlama-1.1B, 729 patches; 7B = CLIP-L/14@336 + "
        "Vicuna-7B). FLOPs, activation bytes and memory are counted on `meta`; times are measured on this CPU.**",
        "",
        "| ratio (scope) | " + " | ".join(HEADLINE_MODES) + " | target / paper |",
        "| --- |" + " ---: |" * len(HEADLINE_MODES) + " --- |",
    ]
    for what, values, target in headline(results):
        lines.append(f"| {what} | " + " | ".join(f"{values[m]:.3f}" for m in HEADLINE_MODES) + f" | {target} |")
    lines += [
        "",
        f"**Peak training memory (GB), the paper's Table 9 quantity, modelled** ({memory_note()}):",
        "",
        "| config | stage | batch | " + " | ".join(MEMORY_MODES) + " | hive / concat |",
        "| --- | ---: | ---: |" + " ---: |" * len(MEMORY_MODES) + " ---: |",
    ]
    for name, stages in results["training_memory"].items():
        for stage, modes in stages.items():
            for batch in map(str, MEMORY_BATCHES):
                peaks = [modes[m]["peak_bytes"][batch] for m in MEMORY_MODES]
                lines.append(
                    f"| {name} | {stage} | {batch} | "
                    + " | ".join(f"{p / 1e9:.1f}" for p in peaks)
                    + f" | {ratio(modes['hive']['peak_bytes'][batch], modes['concat']['peak_bytes'][batch]):.3f} |"
                )
    widths = results["step_time_1B_widths"]
    lines += [
        "",
        f"**CPU step time at the 1B widths ({results['pairs']['1B_shallow']}; batch 1, stage 2, median of "
        "interleaved rounds):**",
        "",
        "| mode | seconds | / concat | / text-only |",
        "| --- | ---: | ---: | ---: |",
    ]
    for mode, value in widths.items():
        lines.append(
            f"| {mode} | {value['median_s']:.3f} | {ratio(value['median_s'], widths['concat']['median_s']):.3f} | "
            f"{ratio(value['median_s'], widths['text']['median_s']):.3f} |"
        )
    lines += [
        "",
        "**Training-step TFLOPs per sample (counted on `meta`; LLM side = all but the vision tower):**",
        "",
        "| config | stage | mode | LLM side | vision tower | end to end | analytic LLM fwd x3 | §8.1 eq. ratio to concat |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, stages in results["flops"].items():
        for stage, modes in stages.items():
            for mode, row in modes.items():
                paper = ratio(row["paper_complexity"], modes["concat"]["paper_complexity"])
                lines.append(
                    f"| {name} | {stage} | {mode} | {row['llm_side'] / 1e12:.3f} | {row['vision'] / 1e12:.3f} | "
                    f"{row['total'] / 1e12:.3f} | {3 * row['analytic_llm_forward'] / 1e12:.3f} | {paper:.3f} |"
                )
    lines += [
        "",
        "**Activation bytes saved for backward (GB per sample):**",
        "",
        "| config | stage | " + " | ".join(MODES) + " |",
        "| --- | ---: |" + " ---: |" * len(MODES),
    ]
    for name, stages in results["activation_bytes"].items():
        for stage, modes in stages.items():
            lines.append(f"| {name} | {stage} | " + " | ".join(f"{modes[m] / 1e9:.3f}" for m in MODES) + " |")
    cpu_bytes = results["activation_bytes_cpu_small"]
    lines.append("| CPU-small, real CPU kernels | 2 | " + " | ".join(f"{cpu_bytes[m] / 1e9:.3f}" for m in MODES) + " |")
    lines += [
        "",
        "On `meta` attention saves what the reference (math) kernel saves, attention probabilities included; "
        "the CPU-small row is measured with the real kernels.",
    ]
    times = results["cpu_step_time"]
    lines += [
        "",
        f"**CPU step time ({results['pairs']['cpu']}, batch 2, stage 2, median of interleaved rounds):**",
        "",
        "| mode | seconds | / concat | / text-only |",
        "| --- | ---: | ---: | ---: |",
    ]
    for mode, value in times.items():
        lines.append(
            f"| {mode} | {value['median_s']:.3f} | {ratio(value['median_s'], times['concat']['median_s']):.3f} | "
            f"{ratio(value['median_s'], times['text']['median_s']):.3f} |"
        )
    generation = results["generation"]
    lines += [
        "",
        "**Generation (CPU-small, one prompt, greedy, KV cache):**",
        "",
        "| mode | prefill (ms) | decode (ms/token) | cached bytes (text KV + vision KV) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for mode, value in generation.items():
        lines.append(
            f"| {mode} | {value['prefill_s'] * 1e3:.1f} | {value['decode_s_per_token'] * 1e3:.2f} | "
            f"{value['text_kv_cache_bytes']:,} + {value['vision_kv_cache_bytes']:,} |"
        )
    return "\n".join(lines) + "\n"


def plots(results: dict, directory: Path) -> list[Path]:
    from hive_adapter.analysis.plots import subplots

    written = []
    scaling_1b = results["scaling_1B"]
    for key, axis, name in (
        ("vision", "vision tokens per image", "flops_vs_vision_tokens.png"),
        ("text", "text tokens", "flops_vs_text_tokens.png"),
    ):
        figure, ax = subplots(figsize=(5.5, 4))
        x = scaling_1b[f"{key}_tokens"]
        for mode, values in scaling_1b[f"llm_side_flops_by_{key}_tokens"].items():
            ax.plot(x, [v / 1e12 for v in values], marker="o", label=mode)
        ax.set(
            xscale="log",
            yscale="log",
            xlabel=axis,
            ylabel="training TFLOPs per sample, LLM side",
            title="1B shape, stage 2",
        )
        ax.legend()
        ax.grid(alpha=0.3)
        figure.tight_layout()
        figure.savefig(directory / name, dpi=120)
        written.append(directory / name)
    timing = results["cpu_time_scaling"]
    figure, ax = subplots(figsize=(5.5, 4))
    for mode, values in timing["median_s"].items():
        ax.plot(timing["vision_tokens"], values, marker="o", label=mode)
    ax.set(xlabel="vision tokens per image", ylabel="seconds per training step", title="CPU-small, stage 2, batch 1")
    ax.legend()
    ax.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(directory / "cpu_time_vs_vision_tokens.png", dpi=120)
    written.append(directory / "cpu_time_vs_vision_tokens.png")
    return written


def main(argv: list[str] | None = None) -> None:
    parser = FullFlagParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    parser.add_argument("--suite", choices=("cpu", "gpu", "all"), default="cpu")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per mode (after one warm-up round)")
    parser.add_argument("--output_dir", type=Path, default=RESULTS)
    parser.add_argument(
        "--tables_only", action="store_true", help="rewrite <suite>.md from an existing <suite>.json; measure nothing"
    )
    args = parser.parse_args(argv)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    if args.tables_only:
        for suite in ["cpu", "gpu"] if args.suite == "all" else [args.suite]:
            source = args.output_dir / f"{suite}.json"
            if source.is_file():
                (args.output_dir / f"{suite}.md").write_text(markdown(json.loads(source.read_text())))
                print("wrote", args.output_dir / f"{suite}.md", "from", source)
        return
    suites = ["cpu", "gpu"] if args.suite == "all" else [args.suite]
    if args.suite == "all" and not torch.cuda.is_available():
        print("no CUDA device: running the cpu suite only")
        suites = ["cpu"]
    for suite in suites:
        results = run_cpu(args.rounds) if suite == "cpu" else run_gpu(args.rounds)
        (args.output_dir / f"{suite}.json").write_text(json.dumps(results, indent=1))
        table = markdown(results)
        (args.output_dir / f"{suite}.md").write_text(table)
        written = plots(results, args.output_dir) if suite == "cpu" else []
        print(table)
        print(
            "wrote",
            ", ".join(str(p) for p in [args.output_dir / f"{suite}.json", args.output_dir / f"{suite}.md", *written]),
        )


if __name__ == "__main__":
    main()
