"""HIVE against concat with a real, frozen language model (issue 30): stage 1 of `hive-train` on SmolLM2.

    python -m benchmarks.real_lm                              # the study: hive and concat, seeds 0,1 (~1 h, 2 cores)
    python -m benchmarks.real_lm --seeds 0 --train_size 1600  # a smaller one (~15 min)
    python -m benchmarks.real_lm --print_commands             # the hive-train command lines, checked; nothing runs
    python -m benchmarks.real_lm --summary                    # only rewrite real_lm.md from the finished runs

The study itself has not been run yet: its times above are estimates. What was run (2026-12-03, 2 cores): a
smoke run of this script at toy size (`--seeds 0 --train_size 32 --held_out 8 --encoder_steps 5`, 1 min 47 s),
whose two steps per connector took 1.5 s (hive) and 2.4 s (concat) each, startup included; by hand earlier, a
HIVE step 1.9 s and a concat step 23 s with all 64 patches spliced (here they are pooled to 16).

What it compares, the paper's stage 1 in the setting whose absence made the small-scale runs fail before (#17):
- the language model: SmolLM2-135M-Instruct (`hive_adapter.real_lm`: 30 layers, width 576, vocabulary 49,152),
  frozen;
- the vision encoder: the toy SigLIP (8 layers x 64, 64x64 images, 64 patches), pre-trained image-text
  contrastive for 600 steps as `hive-reproduce` does it (no real vision encoder ships on the registry), frozen;
- the data: the synthetic shapes set, captions such as "a yellow solid cross in the bottom left" (8 SmolLM2
  tokens) after the prompt "describe the image ."; 3200 training pairs, 256 held out (other seeds);
- stage 1 of Table 3 (HIVE's modules, or concat's projector, train; its optimiser, learning rate and schedule),
  batch 16: 200 steps per run;
- HIVE: levels 1,3,5,7 pooled to 16 tokens each, read by decoder layers 0,7,15,22 (HIVE's default spread over
  30 layers); concat: the deepest level (7), 16 tokens, spliced in front of the text.

Measured per run, in `<output>/runs/<connector>-seed<s>.json` (a finished run is kept and skipped when rerun):
content-token accuracy (the colour, texture, shape and position words, teacher-forced top-1) with each sample's
own image and with the next sample's (the control: a model that reads the picture loses its content tokens),
before (stage 0) and after stage 1; the loss curve; seconds per step; greedy captions of four held-out images.
Use a new `--work_dir` for other settings: hive-train keeps (or refuses to redo) a finished stage.
Every run ends by writing `<output>/real_lm.md` from all finished runs. Checkpoints go to `--work_dir` (kept: the SmolLM2-sized stage
directories are ~0.55 GB each).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from hive_adapter.analysis.image_reading import checkpoint_image_reading
from hive_adapter.analysis.reproduce import HELD_OUT_SEED_OFFSET, prepare_models, seconds_per_step, stage_report
from hive_adapter.console import quiet_progress_bars
from hive_adapter.data.synthetic import SyntheticShapes
from hive_adapter.loading import load_hive
from hive_adapter.real_lm import SMOLLM2, cache_root, smollm2_directory

OUTPUT = Path(__file__).parent / "results" / "real_lm"
CONNECTORS = ("hive", "concat")
VISION_LAYERS, LLM_LAYERS, TOKENS_PER_LEVEL = "1,3,5,7", "0,7,15,22", 16
ENCODER_PRETRAINING_STEPS = 600  # hive-reproduce's default
IMAGE_SIZE = 64  # the toy SigLIP's
CAPTIONS_SHOWN, CAPTION_TOKENS = 4, 12


def say(message: str) -> None:
    print(f"[real_lm] {message}", flush=True)


def vision_encoder(work: Path, seed: int, steps: int = ENCODER_PRETRAINING_STEPS) -> Path:
    """The toy SigLIP of `seed`, pre-trained contrastive for `steps` (its toy LM, left random, is not used)."""
    return (
        prepare_models(
            work / f"encoder-seed{seed}", seed=seed, language_steps=0, vision_steps=ENCODER_PRETRAINING_STEPS
        )
        / "vision"
    )


def hive_train_arguments(
    connector: str, vision: Path, language: Path, run: Path, *, seed: int, train_size: int, batch_size: int
) -> list[str]:
    """hive-train's arguments for stage 1 of `connector` (stage 0, the composed model, is written on the way)."""
    return [
        "--vision_model", str(vision), "--language_model", str(language), "--vision_connector", connector,
        "--hive_vision_layers", VISION_LAYERS, "--hive_llm_layers", LLM_LAYERS,
        "--hive_tokens_per_level", str(TOKENS_PER_LEVEL),
        "--data_format", "synthetic", "--synthetic_size", str(train_size), "--synthetic_seed", str(seed),
        "--stage", "1", "--output_dir", str(run), "--global_batch_size", str(batch_size),
        "--per_device_train_batch_size", str(batch_size), "--logging_steps", "10", "--save_strategy", "no",
        "--report_to", "none", "--seed", str(seed), "--disable_tqdm", "True",
    ]  # fmt: skip


def check_arguments(arguments: list[str]) -> None:
    """hive-train's own checks of its command line (flags, batch sizes, HIVE settings), without a model."""
    from hive_adapter.train import hive_config_from, parse_arguments, validate_run_arguments

    _, hive_args, _, stage_args, base_args, _, explicit = parse_arguments(arguments)
    validate_run_arguments(global_batch_size=stage_args.global_batch_size, training_args=base_args, explicit=explicit)
    hive_config_from(hive_args)


@torch.no_grad()
def greedy_captions(checkpoint: Path, samples: SyntheticShapes, count: int = CAPTIONS_SHOWN) -> list[dict]:
    """What the model writes after the prompt for the first `count` held-out images, greedily."""
    loaded = load_hive(checkpoint)
    tokenizer = loaded.tokenizer
    prefix = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []  # as HiveCaptionCollator
    if loaded.image_token is not None:
        prefix += tokenizer.convert_tokens_to_ids([loaded.image_token])
    rows = []
    for index in range(count):
        sample = samples[index]
        ids = torch.tensor([prefix + tokenizer(sample["prompt"], add_special_tokens=False)["input_ids"]])  # (1, text)
        pixels = loaded.image_processor(images=[sample["image"]], return_tensors="pt")["pixel_values"]
        output = loaded.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=pixels,
            max_new_tokens=CAPTION_TOKENS,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        written = tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True).strip()
        rows.append({"caption": sample["caption"], "written": written})
    return rows


def run(connector: str, seed: int, args: argparse.Namespace, language: Path) -> None:
    result_path = args.output_dir / "runs" / f"{connector}-seed{seed}.json"
    if result_path.is_file():
        say(f"{result_path.name}: done before, kept")
        return
    started = time.time()
    vision = vision_encoder(args.work_dir / f"encoder-{args.encoder_steps}-steps", seed, args.encoder_steps)
    directory = args.work_dir / "runs" / f"{connector}-seed{seed}"
    arguments = hive_train_arguments(
        connector, vision, language, directory, seed=seed, train_size=args.train_size, batch_size=args.batch_size
    )
    completed = subprocess.run([sys.executable, "-m", "hive_adapter.train", *arguments], capture_output=True, text=True)
    if completed.returncode != 0:
        sys.stderr.write(completed.stdout[-4000:] + completed.stderr[-4000:])
        raise SystemExit(f"hive-train failed for {connector} seed {seed} (exit {completed.returncode})")
    trained = time.time() - started
    say(f"{connector} seed {seed}: stage 1 trained in {trained:.0f} s; measuring")
    held_out = SyntheticShapes(args.held_out, seed=HELD_OUT_SEED_OFFSET + seed, image_size=IMAGE_SIZE)
    report = stage_report(directory, 1)
    result = {
        "connector": connector,
        "seed": seed,
        "settings": {
            "train_size": args.train_size,
            "batch_size": args.batch_size,
            "held_out": args.held_out,
            "vision_layers": VISION_LAYERS,
            "llm_layers": LLM_LAYERS,
            "tokens_per_level": TOKENS_PER_LEVEL,
            "encoder_pretraining_steps": args.encoder_steps,
        },  # fmt: skip
        "image_reading": {
            str(stage): checkpoint_image_reading(directory / f"stage{stage}", held_out).to_dict() for stage in (0, 1)
        },
        "losses": report["losses"],  # one per --logging_steps
        "final_loss": report["losses"][-1] if report["losses"] else None,
        "train_loss": report.get("train_loss"),  # the mean over the run
        "steps": report["global_steps"],
        "seconds_per_step": seconds_per_step(report),
        "captions": greedy_captions(directory / "stage1", held_out),
        "seconds": {"training": trained, "all": time.time() - started},
        "command": "python -m hive_adapter.train " + " ".join(arguments),
        "date": time.strftime("%Y-%m-%d"),
        "torch_threads": torch.get_num_threads(),
    }
    result_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.write_text(json.dumps(result, indent=1))
    reading = result["image_reading"]["1"]
    say(
        f"{result_path.name}: content {reading['real']['content']:.1%} own / {reading['swapped']['content']:.1%} "
        f"swapped, {result['seconds_per_step']:.1f} s per step, {time.time() - started:.0f} s in all"
    )


def _cell(values: list[float], percent: bool = True) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values)
    spread = statistics.stdev(values) if len(values) > 1 else None
    if percent:
        return f"{mean:.1%}" + (f" ± {100 * spread:.1f}" if spread is not None else "")
    return f"{mean:.2f}" + (f" ± {spread:.2f}" if spread is not None else "")


def summary(output: Path) -> str:
    runs = [json.loads(path.read_text()) for path in sorted((output / "runs").glob("*.json"))]
    lines = [
        "| connector | seeds | content, own / swapped image, before | after stage 1 | final loss | s per step |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for connector in CONNECTORS:
        results = [r for r in runs if r["connector"] == connector]
        if not results:
            continue
        before = [_cell([r["image_reading"]["0"][kind]["content"] for r in results]) for kind in ("real", "swapped")]
        after = [_cell([r["image_reading"]["1"][kind]["content"] for r in results]) for kind in ("real", "swapped")]
        lines.append(
            f"| {connector} | {','.join(str(r['seed']) for r in results)} | {' / '.join(before)} | "
            f"{' / '.join(after)} | {_cell([r['final_loss'] for r in results if r['final_loss'] is not None], False)} | "
            f"{_cell([r['seconds_per_step'] for r in results], percent=False)} |"
        )
    captions = ["| connector | seed | caption | written after stage 1 (greedy) |", "| --- | --- | --- | --- |"]
    for result in runs:
        for row in result["captions"]:
            written = " ".join(row["written"].split()).replace("|", "\\|")  # one table cell
            captions.append(f"| {result['connector']} | {result['seed']} | {row['caption']} | {written} |")
    return (
        "# HIVE against concat with a real frozen LM (SmolLM2-135M-Instruct), stage 1\n\n"
        f"Generated by `python -m benchmarks.real_lm --summary` from {len(runs)} finished runs in `runs/` (each "
        "records its hive-train command, date and threads). Content: teacher-forced top-1 on the held-out colour, "
        "texture, shape and position tokens, with each sample's own image and with the next sample's (the "
        "control). Mean ± standard deviation over seeds.\n\n" + "\n".join(lines) + "\n\n## Captions\n\n"
        + "\n".join(captions) + "\n"
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.real_lm", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )  # fmt: skip
    parser.add_argument("--connectors", default=",".join(CONNECTORS), help="comma-separated: hive, concat, cascaded")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--train_size", type=int, default=3200, help="training pairs (batch 16: 200 steps)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--held_out", type=int, default=256)
    parser.add_argument("--encoder_steps", type=int, default=ENCODER_PRETRAINING_STEPS, help="contrastive pre-training")
    parser.add_argument("--work_dir", type=Path, default=Path("/tmp/hive-real-lm"), help="checkpoints (kept)")
    parser.add_argument("--output_dir", type=Path, default=OUTPUT)
    parser.add_argument("--print_commands", action="store_true", help="print and check the commands; run nothing")
    parser.add_argument("--summary", action="store_true", help="run nothing; rewrite real_lm.md from the finished runs")
    args = parser.parse_args(argv)
    quiet_progress_bars(reloads_models=True)  # every measurement reloads a checkpoint
    connectors = [c for c in args.connectors.split(",") if c]
    unknown = sorted(set(connectors) - {"hive", "concat", "cascaded"})
    if unknown:
        parser.error(f"--connectors: unknown {unknown}; choose from hive, concat, cascaded")
    seeds = [int(seed) for seed in args.seeds.split(",") if seed]
    if args.print_commands:
        for seed in seeds:
            for connector in connectors:
                arguments = hive_train_arguments(
                    connector,
                    args.work_dir / f"encoder-{args.encoder_steps}-steps" / f"encoder-seed{seed}" / "vision",
                    cache_root() / SMOLLM2.directory_name,
                    args.work_dir / "runs" / f"{connector}-seed{seed}",
                    seed=seed,
                    train_size=args.train_size,
                    batch_size=args.batch_size,
                )
                check_arguments(arguments)
                print("python -m hive_adapter.train " + " ".join(arguments))
        return
    if not args.summary:
        language = smollm2_directory(report=say)
        for seed in seeds:
            for connector in connectors:
                run(connector, seed, args, language)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "real_lm.md").write_text(summary(args.output_dir))
    say(f"written {args.output_dir / 'real_lm.md'}")


if __name__ == "__main__":
    main()
