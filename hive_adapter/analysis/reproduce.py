"""`hive-reproduce`: the paper's comparison (HIVE vs cascaded vs concat) rerun small, on a CPU.

    hive-reproduce --output_dir benchmarks/results/reproduce

The same tiny vision encoder (SigLIP-style, 8 layers) and language model (Llama-style, 4 layers), with
the same random initialisation, are pre-trained three ways on the built-in synthetic captioning set
with the same budget (samples, batch, stages, epochs, seed), through `hive-train`:

- `hive`: levels from layers 2, 4, 6, 8 feed decoder layers 1-4 through gated cross-attention;
- `cascaded`: the same cross-attention, every decoder layer fed the deepest level only;
- `concat`: the deepest level's tokens spliced into the LM's input (the self-attention baseline).

Then, for each: a linear probe of the exported encoder (synthetic shape labels and scikit-learn's
digits), held-out caption-token accuracy (with and without the images), the LM-loss gradient reaching
every encoder layer (norm, and the share that falls on the captioned object), and the FLOPs and
time of one training step. Writes `reproduce.json`, `reproduce.md` and PNGs; prints the table.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from ..data.collator import HiveCaptionCollator
from ..data.synthetic import PROMPT, SyntheticShapes, caption_vocabulary
from ..loading import load_hive
from ..toy import ToySizes, write_toy_models
from .attention import cross_attention_maps
from .captioning import caption_batch
from .gradients import gradient_flow
from .image_reading import checkpoint_image_reading
from .plots import plot_attention_maps, plot_gradient_maps, plot_layer_curves
from .probe import ProbeConfig, linear_probe, load_frozen_encoder
from .probe_data import built_in

CONNECTORS = ("hive", "cascaded", "concat")
HIVE_FLAGS = ["--hive_vision_layers", "1,3,5,7", "--hive_llm_layers", "0,1,2,3", "--hive_tokens_per_level", "16"]
# Table 4's optimiser; on these small sets its batch 512 would give a handful of steps, so the probe
# uses batch 64 for 200 epochs on features encoded once (no augmentation: re-encoding every epoch
# would triple the run time).
PROBE = dict(batch_size=64, augment=False)
PROBE_EPOCHS = 200


def say(message: str) -> None:
    print(f"[hive-reproduce] {message}", flush=True)


def train(connector: str, models: Path, run: Path, args) -> Path:
    """Three-stage `hive-train` for one connector; returns the stage-3 directory (reused if finished)."""
    command = [
        sys.executable, "-m", "hive_adapter.train",
        "--vision_model", str(models / "vision"), "--language_model", str(models / "language"),
        "--vision_connector", connector, *HIVE_FLAGS,
        "--data_format", "synthetic", "--synthetic_size", str(args.train_size), "--stage", "all",
        "--output_dir", str(run), "--global_batch_size", str(args.batch_size),
        "--per_device_train_batch_size", str(args.batch_size), "--save_strategy", "no", "--report_to", "none",
        "--seed", str(args.seed), "--disable_tqdm", "True",
    ]  # fmt: skip
    started = time.time()
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        sys.stderr.write(completed.stdout[-4000:] + completed.stderr[-4000:])
        raise SystemExit(f"hive-train failed for connector {connector!r} (exit {completed.returncode})")
    say(f"  {connector}: trained in {time.time() - started:.0f} s")
    return run / "stage3"


def stage_report(run: Path, stage: int) -> dict:
    return json.loads((run / f"stage{stage}" / "hive_stage.json").read_text())


def seconds_per_step(report: dict) -> float:
    runtime = next(entry["train_runtime"] for entry in reversed(report["log_history"]) if "train_runtime" in entry)
    return runtime / max(1, report["global_steps"])


def encoder_change(before: Path, after: Path) -> float:
    """Relative L2 change of the vision encoder's weights between two checkpoints (how far stage 3 moved it)."""
    first, second = load_frozen_encoder(before)[0].state_dict(), load_frozen_encoder(after)[0].state_dict()
    moved = sum(float((second[name].float() - tensor.float()).pow(2).sum()) for name, tensor in first.items())
    size = sum(float(tensor.float().pow(2).sum()) for tensor in first.values())
    return (moved / size) ** 0.5


def gradient_profile(checkpoint: Path, held_out: SyntheticShapes, count: int) -> dict:
    """Mean per-layer gradient norm and object share over `count` held-out pairs, plus sample 0's maps."""
    loaded = load_hive(checkpoint)
    indices = range(min(count, len(held_out)))
    images = [held_out.image(i) for i in indices]
    captions = [held_out.sample(i).caption for i in indices]
    flow = gradient_flow(loaded.model, caption_batch(loaded, images, captions, prompt=PROMPT))
    masks = torch.stack([torch.from_numpy(np.array(held_out.object_mask(i), dtype=np.float32) / 255) for i in indices])
    object_area = float(masks.mean())
    return {
        "grad_norm": flow.layer_norms.mean(0).tolist(),
        "object_share": flow.object_share(masks).mean(0).tolist(),
        "object_area": object_area,
        "sample_maps": flow.patch_maps[0],
        "sample_norms": flow.layer_norms[0].tolist(),
    }


def step_costs(stage0: dict[str, Path], sample_batch: dict, rounds: int = 5) -> dict[str, dict]:
    """FLOPs (counted; in total and without the vision tower's share) and median seconds of one
    forward+backward with every parameter training (stage 3)."""
    models = {}
    for connector, path in stage0.items():
        model = load_hive(path).model.train()
        model.requires_grad_(True)
        models[connector] = model
    out = {}
    for connector, model in models.items():
        with FlopCounterMode(display=False) as counter:
            model(**sample_batch).loss.backward()
        model.zero_grad(set_to_none=True)
        tower = sum(counter.get_flop_counts().get(f"{type(model).__name__}.vision_model", {}).values())
        total = counter.get_total_flops()
        out[connector] = {"gflops": total / 1e9, "gflops_without_tower": (total - tower) / 1e9, "times": []}
    for _ in range(rounds):  # interleaved, so machine noise hits every connector alike
        for connector, model in models.items():
            started = time.perf_counter()
            model(**sample_batch).loss.backward()
            out[connector]["times"].append(time.perf_counter() - started)
            model.zero_grad(set_to_none=True)
    for connector in out:
        out[connector]["ms"] = 1000 * statistics.median(out[connector].pop("times"))
    return out


def markdown_table(results: dict, probes_untrained: dict) -> str:
    header = (
        "| connector | probe: shapes | probe: digits | content acc. | content acc., swapped image | "
        "grad norm layer 1 | grad norm layer 8 | layer 1 / layer 8 | object share layer 1 | object share layer 8 | "
        "encoder change in stage 3 | GFLOPs / step | GFLOPs / step without the tower | ms / step (fwd+bwd) | "
        "train s / step (stage 3) |"
    )
    lines = [header, "|" + " --- |" * 15]
    lines.append(
        f"| untrained encoder | {probes_untrained['shapes']:.1%} | {probes_untrained['digits']:.1%} |" + " |" * 12
    )
    for connector, row in results.items():
        grad, share = row["grad_norm"], row["object_share"]
        lines.append(
            f"| {connector} | {row['probe']['shapes']:.1%} | {row['probe']['digits']:.1%} | {row['image_reading']['real']['content']:.1%} | "
            f"{row['image_reading']['swapped']['content']:.1%} | {grad[0]:.2e} | {grad[-1]:.2e} | {grad[0] / grad[-1]:.2f} | "
            f"{share[0]:.1%} | {share[-1]:.1%} | {row['encoder_change_stage3']:.2e} | {row['gflops']:.2f} | {row['gflops_without_tower']:.2f} | {row['ms_per_step']:.0f} | "
            f"{row['train_seconds_per_step']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="hive-reproduce", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )  # fmt: skip
    parser.add_argument("--output_dir", type=Path, default=Path("hive_reproduce"), help="results: JSON, markdown, PNGs")
    parser.add_argument(
        "--work_dir",
        type=Path,
        default=None,
        help="checkpoints (kept, and reused on a rerun); default: a temporary directory",
    )
    parser.add_argument("--train_size", type=int, default=4000, help="synthetic pre-training pairs (default 4000)")
    parser.add_argument("--batch_size", type=int, default=32, help="global batch of every stage (default 32)")
    parser.add_argument("--held_out_size", type=int, default=256, help="held-out pairs for caption accuracy")
    parser.add_argument(
        "--gradient_samples", type=int, default=32, help="held-out pairs the gradient norms average over"
    )
    parser.add_argument("--probe_size", type=int, default=2000, help="training images of the shapes probe")
    parser.add_argument("--probe_epochs", type=int, default=PROBE_EPOCHS, help="linear-probe epochs (default 200)")
    parser.add_argument(
        "--connectors", default=",".join(CONNECTORS), help="comma-separated subset of hive,cascaded,concat"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    connectors = [name.strip() for name in args.connectors.split(",") if name.strip()]
    unknown = sorted(set(connectors) - set(CONNECTORS))
    if unknown or not connectors:
        parser.error(f"--connectors {args.connectors!r}: choose from {','.join(CONNECTORS)}")
    for name in ("train_size", "batch_size", "held_out_size", "gradient_samples", "probe_size", "probe_epochs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} {getattr(args, name)}: must be at least 1")

    probe_config = ProbeConfig(epochs=args.probe_epochs, **PROBE)
    started = time.time()
    temporary = None
    work = args.work_dir
    if work is None:
        temporary = tempfile.mkdtemp(prefix="hive-reproduce-")
        work = Path(temporary)
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    try:
        say(f"1/5 tiny models (seed {args.seed}) in {work / 'models'}")
        write_toy_models(work / "models", caption_vocabulary(), seed=args.seed)
        say(
            f"2/5 pre-training {', '.join(connectors)}: {args.train_size} pairs, batch {args.batch_size}, stages 1-3 each"
        )
        finals = {connector: train(connector, work / "models", work / connector, args) for connector in connectors}

        say("3/5 linear probes of the exported encoders (shapes, digits)")
        probe_sets = {name: built_in(name, seed=args.seed, size=args.probe_size) for name in ("shapes", "digits")}

        def probe(path: Path) -> dict[str, float]:
            encoder, processor = load_frozen_encoder(path)
            return {
                name: linear_probe(encoder, processor, *sets, probe_config, progress=False).test_accuracy
                for name, sets in probe_sets.items()
            }

        untrained = probe(work / connectors[0] / "stage0")
        results = {connector: {"probe": probe(final)} for connector, final in finals.items()}

        say("4/5 held-out caption accuracy, gradient flow into the encoder")
        image_size = ToySizes().image_size
        held_out = SyntheticShapes(args.held_out_size, seed=10_000 + args.seed, image_size=image_size)
        profiles = {}
        for connector, final in finals.items():
            row = results[connector]
            row["image_reading"] = checkpoint_image_reading(final, held_out).to_dict()
            # the signal the encoder trains on in stage 3: gradients at the stage-2 checkpoint
            profiles[connector] = gradient_profile(work / connector / "stage2", held_out, args.gradient_samples)
            row.update({key: profiles[connector][key] for key in ("grad_norm", "object_share", "object_area")})
            report = stage_report(work / connector, 3)
            row["train_seconds_per_step"] = seconds_per_step(report)
            row["encoder_change_stage3"] = encoder_change(work / connector / "stage2", final)
            row["losses"] = {stage: stage_report(work / connector, stage)["losses"] for stage in (1, 2, 3)}

        say("5/5 FLOPs and time of one training step (all parameters training)")
        first = load_hive(work / connectors[0] / "stage0")
        train_set = SyntheticShapes(args.batch_size, seed=args.seed, image_size=image_size)
        collator = HiveCaptionCollator(first.tokenizer, first.image_processor)
        sample_batch = collator([train_set[i] for i in range(len(train_set))])
        costs = step_costs({connector: work / connector / "stage0" for connector in connectors}, sample_batch)
        for connector, cost in costs.items():
            results[connector]["gflops"] = cost["gflops"]
            results[connector]["gflops_without_tower"] = cost["gflops_without_tower"]
            results[connector]["ms_per_step"] = cost["ms"]

        figures = write_figures(out, finals, profiles, held_out, work)
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)

    command = "hive-reproduce " + " ".join(argv if argv is not None else sys.argv[1:])
    table = markdown_table(results, untrained)
    import transformers

    environment = {
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "machine": platform.machine(), "cpu_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip
    seconds = time.time() - started
    (out / "reproduce.json").write_text(
        json.dumps(
            {
                "command": command,
                "environment": environment,
                "seconds": seconds,
                "settings": vars(args) | {"output_dir": str(out), "work_dir": str(args.work_dir)},
                "probe_recipe": vars(probe_config),
                "untrained_probe": untrained,
                "results": results,
                "figures": figures,
            },
            indent=2,
            default=str,
        )  # fmt: skip
    )
    (out / "reproduce.md").write_text(
        f"# hive-reproduce\n\n`{command}` ({seconds / 60:.1f} min, {environment['date']}, {environment['machine']}, "
        f"{environment['cpu_threads']} CPU threads, torch {environment['torch']}, transformers {environment['transformers']})\n\n"
        f"{table}\n\n"
        f"- Probe: test accuracy of a linear classifier on the frozen encoder; {probe_config.epochs} epochs, batch "
        f"{probe_config.batch_size}, Table 4's optimiser, no augmentation. shapes: 4 classes, digits: 10.\n"
        "- Content acc.: teacher-forced top-1 on held-out colour, texture, shape and position tokens, with each "
        "sample's own image and with the next sample's image.\n"
        f"- Gradients: at the stage-2 checkpoints (what stage 3 trains the encoder with), mean over "
        f"{args.gradient_samples} held-out pairs; object share: the part of a layer's squared gradient on the "
        f"captioned shape's patches (the shapes cover {results[connectors[0]]['object_area']:.1%} of an image).\n"
        "- Encoder change: relative L2 change of the encoder's weights from stage 2 to stage 3.\n"
        "- FLOPs (torch.utils.flop_counter) and ms: one forward+backward, batch "
        f"{args.batch_size}, every parameter training; train s / step: the Trainer's stage-3 wall time per step.\n\n"
        + "".join(f"![{name}]({name})\n" for name in figures)
    )
    print("\n" + table + "\n")
    say(f"written: {out / 'reproduce.json'}, {out / 'reproduce.md'}, " + ", ".join(figures))
    say(f"finished in {seconds / 60:.1f} min")


def write_figures(
    out: Path, finals: dict[str, Path], profiles: dict[str, dict], held_out: SyntheticShapes, work: Path
) -> list[str]:
    written = [
        plot_layer_curves(
            {c: p["grad_norm"] for c, p in profiles.items()}, out / "gradient_norms.png", log=True,
            ylabel="L2 norm of dLoss / d hidden", title="LM-loss gradient reaching each vision layer (stage-2 checkpoints)",
        ),
        plot_layer_curves(
            {c: p["object_share"] for c, p in profiles.items()}, out / "gradient_object_share.png",
            ylabel="share of squared gradient on the object", title="How much of each layer's gradient falls on the captioned shape",
        ),
        plot_gradient_maps(
            held_out.image(0), {c: (p["sample_maps"], p["sample_norms"]) for c, p in profiles.items()},
            out / "gradient_maps.png", caption=held_out.sample(0).caption,
        ),
    ]  # fmt: skip
    if "hive" in finals:
        loaded = load_hive(finals["hive"])
        batch = caption_batch(loaded, [held_out.image(0)], [held_out.sample(0).caption], prompt=PROMPT)
        maps = cross_attention_maps(loaded.model, batch)
        positions = [i for i, label in enumerate(batch["labels"][0].tolist()) if label != -100 and i > 0]
        tokens = [loaded.tokenizer.convert_ids_to_tokens(batch["input_ids"][0, i].item()) for i in positions]
        chosen = torch.stack([maps.predicting(i) for i in positions])
        written.append(
            plot_attention_maps(
                held_out.image(0),
                chosen,
                row_labels=[f"-> {t}" for t in tokens],
                llm_layers=maps.llm_layers,
                path=out / "attention_maps.png",
            )
        )
    return [path.name for path in written]


if __name__ == "__main__":
    main()
