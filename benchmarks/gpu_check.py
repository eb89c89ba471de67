"""`make gpu-check`: what the first GPU must prove and measure, in one short run straight from a checkout.

    PYTHONPATH=. python -m benchmarks.gpu_check              # one CUDA GPU; sized for < 8 min on an H100 (not run yet)
    PYTHONPATH=. python -m benchmarks.gpu_check --dry_run    # everything but CUDA: CPU, tiny shapes, reference flash

In order (`benchmarks.kernel_checks` for the first four):
1. kernel parity: a tiny HIVE model on flash-attn against SDPA, bf16, forward and HIVE's gradients within 2e-2,
   with a spy counting flash-attn's calls (HIVE's blocks and the language model), captioning and text before
   the image;
2. one training step under flash at the 1B shape: finite loss and gradients, non-zero gate gradients, gates moved;
3. packed rows under a flash language model: each sample's logits equal to the sample run alone;
4. the dtype audit: gates and norms after `.to(bf16)`, and after a one-GPU DeepSpeed ZeRO-2 bf16 init and step;
5. the paper's figures: training-step time (median of interleaved rounds) and peak CUDA memory of a step, hive /
   hive_lean / concat at the 1B shape (SigLIP-so400m/14@384 + TinyLlama-1.1B, all 729 patches), bf16, stage 2,
   flash vs SDPA, next to the memory model of `benchmarks.memory`.

Needs torch, transformers (5.17 or newer), safetensors; flash-attn for the flash parts and DeepSpeed for the
ZeRO-2 audit (each is reported as skipped, with the reason, where it does not import). Writes `gpu.json` and
`gpu.md` to `--output_dir` (default `benchmarks/results/gpu/`); exits 1 if any check failed.
"""

from __future__ import annotations

import json
import platform
import sys
import time
import traceback
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import torch

from hive_adapter.utils.flags import FullFlagParser

from . import kernel_checks
from .configs import PAPER_1B, TINY
from .measure import peak_step_memory, step_times
from .memory import GRADIENT_BYTES, WEIGHT_BYTES, training_memory

RESULTS = Path(__file__).resolve().parent / "results" / "gpu"
PAIRS = {"1B": PAPER_1B, "tiny": TINY}
MODES = ("hive", "hive_lean", "concat")
KERNELS = ("sdpa", kernel_checks.FLASH)


def environment(device: torch.device) -> dict:
    import transformers

    info = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
    }
    for package in ("flash_attn", "deepspeed"):
        try:
            info[package] = __import__(package).__version__
        except Exception as error:  # noqa: BLE001  (absent or broken: said, not fatal)
            info[package] = f"unavailable ({type(error).__name__}: {error})"[:300]
    if device.type == "cuda":
        info["cuda_device"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def guarded(name: str, check) -> dict:
    """A check's result, or what stopped it: a missing flash-attn is `skipped`, anything else `failed`."""
    started = time.time()
    try:
        result = check()
    except kernel_checks.FlashUnavailable as error:
        result = {"ok": None, "skipped": str(error)}
    except Exception as error:  # noqa: BLE001  (one broken check must not hide the others' results)
        result = {"ok": False, "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-3000:]}
    result["seconds"] = round(time.time() - started, 1)
    print(f"[gpu-check] {name}: {verdict(result)} ({result['seconds']} s)", flush=True)
    return result


def verdict(result: dict) -> str:
    if result.get("ok") is None:
        return f"skipped ({result.get('skipped', '')})"
    return "passed" if result["ok"] else f"FAILED {result.get('error', '')}".strip()


def figures(pair_name: str, *, device: torch.device, batch: int, rounds: int, dry_run: bool, stage: int = 2) -> dict:
    """Step time and peak memory per kernel and mode; a kernel that cannot run is reported, not fatal."""
    pair = PAIRS[pair_name]
    rows: dict = {}
    for kernel in KERNELS:
        started = time.time()
        try:
            with kernel_checks.flash_kernels(dry_run) if kernel != "sdpa" else nullcontext(Counter()) as calls:
                per_mode = {}
                for mode in MODES:  # one model at a time on the device, so each peak is its own
                    memory = training_memory(pair, mode, stage=stage)
                    per_mode[mode] = {
                        "peak_bytes": peak_step_memory(pair, mode, stage=stage, batch=batch, device=str(device),
                                                       attn_implementation=kernel)
                        if device.type == "cuda" else None,
                        "predicted_bytes_without_optimizer": WEIGHT_BYTES * memory.parameters
                        + GRADIENT_BYTES * memory.trainable + batch * memory.activation_bytes_per_sample,
                    }  # fmt: skip
                times = step_times(pair, list(MODES), stage=stage, batch=batch, rounds=rounds, device=str(device),
                                   dtype=torch.bfloat16, attn_implementation=kernel)  # fmt: skip
                for mode in MODES:
                    per_mode[mode].update(times[mode])
            rows[kernel] = {"modes": per_mode, "flash_calls": dict(calls), "seconds": round(time.time() - started, 1)}
        except kernel_checks.FlashUnavailable as error:
            rows[kernel] = {"skipped": str(error)}
        except Exception as error:  # noqa: BLE001
            rows[kernel] = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-3000:]}
        print(f"[gpu-check] figures, {kernel}: {'done' if 'modes' in rows[kernel] else rows[kernel]}", flush=True)
    return {"pair": pair.name, "stage": stage, "batch": batch, "rounds": rounds, "dtype": "bfloat16", "kernels": rows}


def run(*, dry_run: bool, pair: str, batch: int, rounds: int) -> dict:
    device = torch.device("cpu" if dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu-check: no CUDA device is visible (torch.cuda.is_available() is False); --dry_run on CPU")
    started = time.time()
    step_pair = TINY if dry_run else PAPER_1B
    where = str(device)
    checks = {
        "kernel_parity": guarded("kernel parity", lambda: kernel_checks.parity(where, dry_run)),
        "one_step": guarded("one step", lambda: kernel_checks.one_step(where, dry_run, step_pair)),
        "packing_under_flash": guarded("packing under flash", lambda: kernel_checks.packing(where, dry_run)),
        "dtype_audit": guarded("dtype audit", lambda: kernel_checks.dtype_audit(where)),
    }
    return {
        "environment": environment(device),
        "dry_run": dry_run,
        "checks": checks,
        "figures": figures(pair, device=device, batch=batch, rounds=rounds, dry_run=dry_run),
        "seconds": round(time.time() - started, 1),
    }


def markdown(results: dict) -> str:
    env = results["environment"]
    where = env.get("cuda_device", env["device"])
    lines = [
        f"`make gpu-check`{' --dry_run' if results['dry_run'] else ''} on {where} ({env['date']}, torch "
        f"{env['torch']}, transformers {env['transformers']}, flash_attn {env['flash_attn']}, deepspeed "
        f"{env['deepspeed']}), {results['seconds']:.0f} s.",
        "",
        "| check | result | figures |",
        "| --- | --- | --- |",
    ]
    for name, result in results["checks"].items():
        shown = {k: v for k, v in result.items() if k not in ("ok", "traceback", "seconds")}
        lines.append(f"| {name} | {verdict(result)} | `{json.dumps(shown, default=str)[:400]}` |")
    figures = results["figures"]
    lines += [
        "",
        f"{figures['pair']}, {figures['dtype']}, stage {figures['stage']}, batch {figures['batch']}, median of "
        f"{figures['rounds']} interleaved rounds.",
        "",
        "| kernel | mode | step (s) | / concat | peak memory (GB, measured) | / concat | memory model (GB, no optimizer) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for kernel, row in figures["kernels"].items():
        if "modes" not in row:
            lines.append(f"| {kernel} | - | {row.get('skipped') or row.get('error')} | | | | |")
            continue
        modes = row["modes"]
        concat = modes["concat"]
        for mode, cell in modes.items():
            peak = cell.get("peak_bytes")
            peak_text = f"{peak / 1e9:.2f} | {peak / concat['peak_bytes']:.3f}" if peak else "n/a | n/a"
            lines.append(
                f"| {kernel} | {mode} | {cell['median_s']:.3f} | {cell['median_s'] / concat['median_s']:.3f} | "
                f"{peak_text} | {cell['predicted_bytes_without_optimizer'] / 1e9:.2f} |"
            )
    return "\n".join(lines) + "\n"


def failed(results: dict) -> list[str]:
    return [name for name, result in results["checks"].items() if result.get("ok") is False]


def main(argv: list[str] | None = None) -> None:
    parser = FullFlagParser(prog="benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry_run", action="store_true", help="everything but CUDA: CPU, tiny, reference flash")
    parser.add_argument("--pair", choices=sorted(PAIRS), default=None, help="figures' shape (default 1B; tiny dry)")
    parser.add_argument("--batch", type=int, default=None, help="figures' batch (default 8; 2 dry)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 5; 1 dry)")
    parser.add_argument("--output_dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    dry = args.dry_run
    results = run(
        dry_run=dry,
        pair=args.pair or ("tiny" if dry else "1B"),
        batch=args.batch or (2 if dry else 8),
        rounds=args.rounds or (1 if dry else 5),
    )
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "gpu.json").write_text(json.dumps(results, indent=2, default=str))
    (args.output_dir / "gpu.md").write_text(markdown(results))
    print(markdown(results))
    print(
        f"[gpu-check] {results['seconds']:.0f} s; written: {args.output_dir / 'gpu.json'}, {args.output_dir / 'gpu.md'}"
    )
    bad = failed(results)
    if bad:
        print(f"[gpu-check] failed checks: {', '.join(bad)}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
