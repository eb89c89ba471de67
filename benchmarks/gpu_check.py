"""`make gpu-check`: the GPU figures in one short run, straight from a checkout (`PYTHONPATH=.`).

    PYTHONPATH=. python -m benchmarks.gpu_check                      # a CUDA machine, ~3-5 minutes
    PYTHONPATH=. python -m benchmarks.gpu_check --device cpu --pair tiny --output_dir /tmp/x   # the plumbing

Needs only torch, transformers (5.17 or newer), safetensors and matplotlib: no install step, no DeepSpeed,
no flash-attn (SDPA kernels), nothing downloaded. At the 1B shapes (SigLIP-so400m/14@384 + TinyLlama-1.1B,
all 729 patches), bf16, stage 2 (HIVE + LLM train), for hive / hive_pooled / hive_lean / concat / text:
the median training-step time of interleaved rounds and the peak CUDA memory of a step (weights,
gradients and activations; no optimizer state), next to the memory model of `benchmarks.memory` for the
same batch. Writes `gpu.json` and `gpu.md` to `--output_dir` (default `benchmarks/results/`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from hive_adapter.utils.flags import FullFlagParser

from .configs import PAPER_1B, TINY
from .measure import peak_step_memory, step_times
from .memory import GRADIENT_BYTES, WEIGHT_BYTES, training_memory

RESULTS = Path(__file__).resolve().parent / "results"
PAIRS = {"1B": PAPER_1B, "tiny": TINY}
MODES = ("hive", "hive_pooled", "hive_lean", "concat", "text")


def environment(device: torch.device) -> dict:
    import platform

    import transformers

    info = {
        "date": time.strftime("%Y-%m-%d"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["cuda_device"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def run(pair_name: str, *, device: str, batch: int, rounds: int, stage: int = 2) -> dict:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu-check: no CUDA device is visible (torch.cuda.is_available() is False)")
    pair = PAIRS[pair_name]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    started = time.time()
    rows = {}
    for mode in MODES:  # one model at a time on the device, so each peak is its own
        memory = training_memory(pair, mode, stage=stage)
        rows[mode] = {
            "peak_bytes": peak_step_memory(pair, mode, stage=stage, batch=batch, device=str(device), dtype=dtype)
            if device.type == "cuda"
            else None,
            # the same terms the memory model counts, less the optimizer state a bare step does not hold
            "predicted_bytes_without_optimizer": WEIGHT_BYTES * memory.parameters
            + GRADIENT_BYTES * memory.trainable
            + batch * memory.activation_bytes_per_sample,
        }
    times = step_times(pair, list(MODES), stage=stage, batch=batch, rounds=rounds, device=str(device), dtype=dtype)
    for mode in MODES:
        rows[mode].update(times[mode])
    return {
        "environment": environment(device),
        "pair": pair.name,
        "stage": stage,
        "batch": batch,
        "dtype": str(dtype).replace("torch.", ""),
        "rounds": rounds,
        "modes": rows,
        "seconds": time.time() - started,
    }


def markdown(results: dict) -> str:
    env = results["environment"]
    where = env.get("cuda_device", env["device"])
    rows = results["modes"]
    concat = rows["concat"]
    lines = [
        f"`make gpu-check` on {where} ({env['date']}, torch {env['torch']}, transformers {env['transformers']}): "
        f"{results['pair']}, {results['dtype']}, stage {results['stage']}, batch {results['batch']}, median of "
        f"{results['rounds']} interleaved rounds.",
        "",
        "| mode | step (s) | / concat | peak memory (GB, measured) | / concat | memory model (GB, no optimizer) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for mode, row in rows.items():
        peak = row.get("peak_bytes")
        peak_text = f"{peak / 1e9:.2f} | {peak / concat['peak_bytes']:.3f}" if peak else "n/a | n/a"
        lines.append(
            f"| {mode} | {row['median_s']:.3f} | {row['median_s'] / concat['median_s']:.3f} | {peak_text} | "
            f"{row['predicted_bytes_without_optimizer'] / 1e9:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = FullFlagParser(prog="benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--pair", choices=sorted(PAIRS), default="1B")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output_dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    results = run(args.pair, device=args.device, batch=args.batch, rounds=args.rounds)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "gpu.json").write_text(json.dumps(results, indent=2))
    (args.output_dir / "gpu.md").write_text(markdown(results))
    print(markdown(results))
    print(
        f"[gpu-check] {results['seconds']:.0f} s; written: {args.output_dir / 'gpu.json'}, {args.output_dir / 'gpu.md'}"
    )


if __name__ == "__main__":
    main()
