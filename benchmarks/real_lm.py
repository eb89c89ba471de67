"""HIVE against concat with a real language model (issue 30): stages 1 and 2 of `hive-train` on SmolLM2.

    python -m benchmarks.real_lm                              # the study: hive and concat, seeds 0,1, stages 1,2
    python -m benchmarks.real_lm --stages 1                   # stage 1 only (the LM stays frozen; ~25 min)
    python -m benchmarks.real_lm --connectors cascaded --seeds 0
    python -m benchmarks.real_lm --time_breakdown             # where a training step's time goes; nothing trains
    python -m benchmarks.real_lm --print_commands             # the hive-train command lines, checked; nothing runs
    python -m benchmarks.real_lm --summary                    # only rewrite real_lm.md from the finished runs

Each run states its own time in its JSON (`seconds`, `torch_threads`); real_lm.md gives seconds per step.

What it compares, the paper's stage 1 in the setting whose absence made the small-scale runs fail before (#17),
then its stage 2:
- the language model: SmolLM2-135M-Instruct (`hive_adapter.tools.real_lm`: 30 layers, width 576, vocabulary 49,152),
  frozen in stage 1, trained in stage 2;
- the vision encoder: the toy SigLIP (8 layers x 64, 64x64 images, 64 patches), pre-trained image-text
  contrastive for 600 steps as `hive-reproduce` does it (no real vision encoder ships on the registry), frozen;
- the data: the synthetic shapes set, captions such as "a yellow solid cross in the bottom left" (8 SmolLM2
  tokens) after the prompt "describe the image ."; 1600 training pairs, 256 held out (other seeds);
- stages 1 and 2 of Table 3 (stage 1: HIVE's modules, or concat's projector; stage 2: those and the LLM; each
  stage's optimiser, learning rate and schedule), batch 16, one epoch each (Table 3's stage 2 has two: halved to
  fit the budget): 100 steps per stage;
- HIVE: levels 1,3,5,7 pooled to 16 tokens each, read by decoder layers 0,7,15,22 (HIVE's default spread over
  30 layers); concat: the deepest level (7), 16 tokens, spliced in front of the text.

Measured per run, in `<output>/runs/<connector>-seed<s>.json` (a finished run is kept and skipped when rerun):
content-token accuracy (the colour, texture, shape and position words, teacher-forced top-1) with each sample's
own image and with the next sample's (the control: a model that reads the picture loses its content tokens),
before (stage 0) and after each stage; the loss curve; seconds per step; greedy captions of four held-out images.
Use a new `--work_dir` for other settings: hive-train keeps (or refuses to redo) a finished stage.
Every run ends by writing `<output>/real_lm.md` from all finished runs. Checkpoints go to `--work_dir` (kept: the
SmolLM2-sized stage directories are ~0.55 GB each).
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
from hive_adapter.analysis.reproduce_settings import HELD_OUT_SEED_OFFSET
from hive_adapter.analysis.reproduce_work import prepare_models, seconds_per_step, stage_report
from hive_adapter.data.synthetic import SyntheticShapes
from hive_adapter.model.config import HiveConfig
from hive_adapter.model.loading import load_hive
from hive_adapter.tools.real_lm import SMOLLM2, cache_root, smollm2_directory
from hive_adapter.utils.console import quiet_progress_bars
from hive_adapter.utils.flags import FullFlagParser

from .real_lm_settings import (
    CAPTION_TOKENS,
    CAPTIONS_SHOWN,
    CONNECTORS,
    ENCODER_PRETRAINING_STEPS,
    IMAGE_SIZE,
    LLM_LAYERS,
    OUTPUT,
    STAGE_ONE_ONLY,
    STAGES,
    TOKENS_PER_LEVEL,
    VISION_LAYERS,
    say,
)
from .real_lm_timing import breakdown_table, time_breakdown


def vision_encoder(work: Path, seed: int, steps: int = ENCODER_PRETRAINING_STEPS) -> Path:
    """The toy SigLIP of `seed`, pre-trained contrastive for `steps` (its toy LM, left random, is not used)."""
    return prepare_models(work / f"encoder-seed{seed}", seed=seed, language_steps=0, vision_steps=steps) / "vision"


def hive_train_arguments(
    connector: str,
    vision: Path,
    language: Path,
    run: Path,
    *,
    seed: int,
    train_size: int,
    batch_size: int,
    stages: tuple[int, ...] = STAGES,
    initializer_range: float | None = None,
) -> list[str]:
    """hive-train's arguments for `stages` of `connector` (stage 0, the composed model, is written on the way);
    `initializer_range`: HIVE's start (None: the library's default, scaled to each layer's width)."""
    epochs = ["--num_train_epochs", "1"] if 2 in stages else []  # Table 3's stage 2 has 2 epochs; one fits the budget
    if initializer_range is not None:
        epochs += ["--hive_initializer_range", repr(initializer_range)]
    return [
        "--vision_model", str(vision), "--language_model", str(language), "--vision_connector", connector,
        "--hive_vision_layers", VISION_LAYERS, "--hive_llm_layers", LLM_LAYERS,
        "--hive_tokens_per_level", str(TOKENS_PER_LEVEL),
        "--data_format", "synthetic", "--synthetic_size", str(train_size), "--synthetic_seed", str(seed),
        "--stage", ",".join(map(str, stages)), "--output_dir", str(run), "--global_batch_size", str(batch_size),
        "--per_device_train_batch_size", str(batch_size), "--logging_steps", "10", "--save_strategy", "no",
        "--report_to", "none", "--seed", str(seed), "--disable_tqdm", "True", *epochs,
    ]  # fmt: skip


def check_arguments(arguments: list[str]) -> None:
    """hive-train's own checks of its command line (flags, batch sizes, HIVE settings), without a model."""
    from hive_adapter.training.train import hive_config_from, parse_arguments, validate_run_arguments

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


def run_label(connector: str, initializer_range: float | None) -> tuple[str, str]:
    """The table's label and the file stem of one setting: `hive`, or `hive (init 0.02)` / `hive-init0.02`."""
    if initializer_range is None:
        return connector, connector
    return f"{connector} (init {initializer_range:g})", f"{connector}-init{initializer_range:g}"


def run(connector: str, seed: int, args: argparse.Namespace, language: Path) -> None:
    label, stem = run_label(connector, args.hive_initializer_range)
    result_path = args.output_dir / "runs" / f"{stem}-seed{seed}.json"
    if result_path.is_file():
        say(f"{result_path.name}: done before, kept")
        return
    started = time.time()
    vision = vision_encoder(args.work_dir / f"encoder-{args.encoder_steps}-steps", seed, args.encoder_steps)
    directory = args.work_dir / "runs" / f"{stem}-seed{seed}"
    arguments = hive_train_arguments(
        connector, vision, language, directory, seed=seed, train_size=args.train_size, batch_size=args.batch_size,
        stages=args.stages, initializer_range=args.hive_initializer_range,
    )  # fmt: skip
    completed = subprocess.run(
        [sys.executable, "-m", "hive_adapter.training.train", *arguments], capture_output=True, text=True
    )
    if completed.returncode != 0:
        sys.stderr.write(completed.stdout[-4000:] + completed.stderr[-4000:])
        raise SystemExit(f"hive-train failed for {connector} seed {seed} (exit {completed.returncode})")
    trained = time.time() - started
    say(f"{connector} seed {seed}: stages {args.stages} trained in {trained:.0f} s; measuring")
    held_out = SyntheticShapes(args.held_out, seed=HELD_OUT_SEED_OFFSET + seed, image_size=IMAGE_SIZE)
    stages = {}
    for stage in args.stages:
        report = stage_report(directory, stage)
        stages[str(stage)] = {
            "losses": report["losses"],  # one per --logging_steps
            "final_loss": report["losses"][-1] if report["losses"] else None,
            "train_loss": report.get("train_loss"),  # the mean over the stage
            "steps": report["global_steps"],
            "seconds_per_step": seconds_per_step(report),
            "captions": greedy_captions(directory / f"stage{stage}", held_out),
        }
    result = {
        "connector": connector,
        "label": label,
        "seed": seed,
        "settings": {
            "train_size": args.train_size,
            "batch_size": args.batch_size,
            "held_out": args.held_out,
            "vision_layers": VISION_LAYERS,
            "llm_layers": LLM_LAYERS,
            "tokens_per_level": TOKENS_PER_LEVEL,
            "encoder_pretraining_steps": args.encoder_steps,
            "stages": list(args.stages),
            "initializer_range": args.hive_initializer_range,  # None: the library's default
        },  # fmt: skip
        "image_reading": {
            str(stage): checkpoint_image_reading(directory / f"stage{stage}", held_out).to_dict()
            for stage in (0, *args.stages)
        },
        "stages": stages,
        "seconds": {"training": trained, "all": time.time() - started},
        "command": "python -m hive_adapter.training.train " + " ".join(arguments),
        "date": time.strftime("%Y-%m-%d"),
        "torch_threads": torch.get_num_threads(),
    }
    result_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.write_text(json.dumps(result, indent=1))
    reading = result["image_reading"][str(args.stages[-1])]
    say(
        f"{result_path.name}: content after stage {args.stages[-1]} {reading['real']['content']:.1%} own / "
        f"{reading['swapped']['content']:.1%} swapped, {time.time() - started:.0f} s in all"
    )


def _cell(values: list[float], percent: bool = True) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values)
    spread = statistics.stdev(values) if len(values) > 1 else None
    if percent:
        return f"{mean:.1%}" + (f" ± {100 * spread:.1f}" if spread is not None else "")
    return f"{mean:.2f}" + (f" ± {spread:.2f}" if spread is not None else "")


def _stages_of(result: dict) -> dict[str, dict]:
    """Per-stage figures of a run; runs written before stage 2 was measured kept them at the top level."""
    if "stages" in result:
        return result["stages"]
    keys = ("losses", "final_loss", "train_loss", "steps", "seconds_per_step", "captions")
    return {"1": {key: result.get(key) for key in keys}}


LOSS_THRESHOLD = 0.5  # stage 1's pace: the first logged step (every 10) whose training loss is below it


def steps_to_loss(results: list[dict], below: float = LOSS_THRESHOLD) -> str:
    """Per seed, the first logged stage-1 step whose loss is below `below` (– never): how fast stage 1 learns."""
    cells = []
    for result in results:
        losses = _stages_of(result).get("1", {}).get("losses") or []
        step = next((10 * (index + 1) for index, loss in enumerate(losses) if loss < below), None)
        cells.append("–" if step is None else str(step))
    return ", ".join(cells)


def _runs(folder: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))]


def _table(runs: list[dict]) -> list[str]:
    """One row per connector: content before and after each stage (mean ± sd over seeds), loss, s per step."""
    stages = sorted({int(stage) for result in runs for stage in _stages_of(result)})
    header = " | ".join(f"after stage {stage}" for stage in stages)
    lines = [
        f"| connector | seeds | content, own / swapped image, before | {header} | final loss per stage | "
        f"stage-1 steps to loss < {LOSS_THRESHOLD:g} | s per step per stage |",
        "| --- | --- | --- | " + "--- | " * len(stages) + "--- | --- | --- |",
    ]
    order = sorted(runs, key=lambda r: (CONNECTORS.index(r["connector"]), r.get("label", r["connector"])))
    for label in dict.fromkeys(r.get("label", r["connector"]) for r in order):
        results = [r for r in runs if r.get("label", r["connector"]) == label]

        def reading(stage: int, results: list[dict] = results) -> str:
            done = [r["image_reading"][str(stage)] for r in results if str(stage) in r["image_reading"]]
            return " / ".join(_cell([d[kind]["content"] for d in done]) for kind in ("real", "swapped"))

        def per_stage(key: str, results: list[dict] = results) -> str:
            cells = []
            for stage in stages:
                values = [_stages_of(r).get(str(stage), {}).get(key) for r in results]
                cells.append(_cell([v for v in values if v is not None], percent=False))
            return " / ".join(cells)

        lines.append(
            f"| {label} | {','.join(str(r['seed']) for r in results)} | {reading(0)} | "
            + " | ".join(reading(stage) for stage in stages)
            + f" | {per_stage('final_loss')} | {steps_to_loss(results)} | {per_stage('seconds_per_step')} |"
        )
    return lines


def summary(output: Path) -> str:
    runs = _runs(output / "runs")
    earlier = _runs(output / "runs" / STAGE_ONE_ONLY)
    captions = ["| connector | seed | stage | caption | written (greedy) |", "| --- | --- | --- | --- | --- |"]
    for result in runs:
        for stage, figures in _stages_of(result).items():
            for row in figures["captions"] or []:
                written = " ".join(row["written"].split()).replace("|", "\\|")  # one table cell
                captions.append(
                    f"| {result['connector']} | {result['seed']} | {stage} | {row['caption']} | {written} |"
                )
    threads = sorted({r.get("torch_threads") for r in runs + earlier if r.get("torch_threads")})
    text = (
        "# HIVE against concat with a real LM (SmolLM2-135M-Instruct): stage 1 (LM frozen), stage 2 (LM trains)\n\n"
        f"Generated by `python -m benchmarks.real_lm --summary` from {len(runs)} finished runs in `runs/` (each "
        "records its hive-train command, date and threads). Content: teacher-forced top-1 on the held-out colour, "
        "texture, shape and position tokens, with each sample's own image and with the next sample's (the "
        f"control). Mean ± standard deviation over seeds. Torch threads per run: {threads}. Seconds per step are "
        "each run's own, on a machine shared with other work: compare connectors with `time_breakdown.json` "
        "(both measured in one run).\n\n" + "\n".join(_table(runs))
    )  # fmt: skip
    if earlier:
        text += (
            f"\n\n## Stage 1 only: the first measurement ({len(earlier)} runs in `runs/{STAGE_ONE_ONLY}/`)\n\n"
            + "\n".join(_table(earlier))
        )
    return text + "\n\n## Captions\n\n" + "\n".join(captions) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = FullFlagParser(
        prog="python -m benchmarks.real_lm", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )  # fmt: skip
    parser.add_argument("--connectors", default=",".join(CONNECTORS), help="comma-separated: hive, concat, cascaded")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--train_size", type=int, default=1600, help="training pairs (batch 16: 100 steps a stage)")
    parser.add_argument("--stages", default="1,2", help="1 or 1,2 (stage 2 trains the LLM too)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--held_out", type=int, default=256)
    parser.add_argument("--encoder_steps", type=int, default=ENCODER_PRETRAINING_STEPS, help="contrastive pre-training")
    parser.add_argument("--work_dir", type=Path, default=Path("/tmp/hive-real-lm"), help="checkpoints (kept)")
    parser.add_argument(
        "--hive_initializer_range", type=float, default=None,
        help="hive-train's option: HIVE's start std (default: the library's, 1/sqrt(fan_in)); rows labelled 'init x'",
    )  # fmt: skip
    parser.add_argument("--output_dir", type=Path, default=OUTPUT)
    parser.add_argument("--print_commands", action="store_true", help="print and check the commands; run nothing")
    parser.add_argument("--summary", action="store_true", help="run nothing; rewrite real_lm.md from the finished runs")
    parser.add_argument("--time_breakdown", action="store_true", help="time a step's parts (no training), write JSON")
    parser.add_argument("--repeats", type=int, default=5, help="--time_breakdown: timed steps per part (median)")
    args = parser.parse_args(argv)
    quiet_progress_bars(reloads_models=True)  # every measurement reloads a checkpoint
    connectors = [c for c in args.connectors.split(",") if c]
    unknown = sorted(set(connectors) - {"hive", "concat", "cascaded"})
    if unknown:
        parser.error(f"--connectors: unknown {unknown}; choose from hive, concat, cascaded")
    seeds = [int(seed) for seed in args.seeds.split(",") if seed]
    if args.stages not in ("1", "1,2"):
        parser.error(f"--stages {args.stages!r}: give 1 or 1,2")
    args.stages = tuple(int(stage) for stage in args.stages.split(","))
    if args.hive_initializer_range is not None:  # refused here, not after an encoder's pre-training
        try:
            HiveConfig(initializer_range=args.hive_initializer_range)
        except ValueError as error:
            parser.error(f"--hive_initializer_range: {error}")
    if args.print_commands:
        for seed in seeds:
            for connector in connectors:
                arguments = hive_train_arguments(
                    connector,
                    args.work_dir / f"encoder-{args.encoder_steps}-steps" / f"encoder-seed{seed}" / "vision",
                    cache_root() / SMOLLM2.directory_name,
                    args.work_dir / "runs" / f"{run_label(connector, args.hive_initializer_range)[1]}-seed{seed}",
                    seed=seed,
                    train_size=args.train_size,
                    batch_size=args.batch_size,
                    stages=args.stages,
                    initializer_range=args.hive_initializer_range,
                )
                check_arguments(arguments)
                print("python -m hive_adapter.training.train " + " ".join(arguments))
        return
    if args.time_breakdown:
        results = time_breakdown(
            smollm2_directory(report=say), batch_size=args.batch_size, repeats=args.repeats, connectors=connectors
        )
        results["date"] = time.strftime("%Y-%m-%d")
        args.output_dir.mkdir(parents=True, exist_ok=True)
        (args.output_dir / "time_breakdown.json").write_text(json.dumps(results, indent=1))
        print(breakdown_table(results))
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
