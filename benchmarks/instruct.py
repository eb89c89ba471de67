"""Instruction tuning, measured: after `hive-train --stage sft`, does the model answer from the picture?

    python -m benchmarks.instruct --seeds 0,1,2        # hive and concat (~3 min a seed on 2 quiet cores)
    python -m benchmarks.instruct --seeds 0,1,2 --connectors hive --hive_initializer_range 0.1

Each run adds its rows to `results/instruct/instruct.json` (refused if its settings differ from the table's) and
rewrites `instruct.md`: per run and question type, mean ± sd over the seeds it has, with the seed count.

From one pre-trained start per seed (the toy SigLIP and Llama, pre-trained as hive-reproduce does it: the LM on
synthetic captions for 300 steps, the encoder contrastively for 600; the tokenizer knows the questions' words),
each connector runs the three pre-training stages on synthetic captions, then the sft stage on synthetic
conversations (`hive_adapter.data.conversations.SyntheticConversations`: questions about colour, shape,
texture and position, two phrasings each, one or two rounds; every 10th conversation shows two pictures and asks
about the second; every 8th is text-only). Both connectors get the same data, steps and learning rates.

Measured on held-out conversations (another seed): the first answer, generated greedily after the first
question (exact match of its words), with each conversation's own pictures and with each picture swapped for the
next conversation's (the control: a model that reads the picture falls to about chance, a text prior stays).
Chance: colour 1/6, shape 1/4, texture 1/3, position 1/5 (the answer's words must all match).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

from hive_adapter.utils.flags import FullFlagParser

OUTPUT = Path(__file__).parent / "results" / "instruct"
CONNECTORS = ("hive", "concat")  # the default rows
OTHER_CONNECTORS = ("cascaded", "deepstack")  # by --connectors
HIVE_FLAGS = ["--hive_vision_layers", "1,3,5,7", "--hive_llm_layers", "0,1,2,3", "--hive_tokens_per_level", "16"]


def say(message: str) -> None:
    print(f"[instruct] {message}", flush=True)


def prepare_models(directory: Path, seed: int, *, language_steps: int, vision_steps: int) -> Path:
    from hive_adapter.data.conversations import instruction_vocabulary
    from hive_adapter.tools.toy_models import write_toy_models
    from hive_adapter.tools.toy_pretraining import ToyPretraining

    if not (directory / "vision" / "config.json").is_file():
        pretraining = ToyPretraining(language_steps=language_steps, vision_steps=vision_steps)
        write_toy_models(directory, instruction_vocabulary(), seed=seed, pretraining=pretraining)
    return directory


def hive_train(*args: str) -> float:
    started = time.time()
    command = [sys.executable, "-m", "hive_adapter.training.train", *map(str, args), "--report_to", "none",
               "--save_strategy", "no", "--disable_tqdm", "True"]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        sys.stderr.write(completed.stdout[-4000:] + completed.stderr[-4000:])
        raise SystemExit(f"hive-train failed: {' '.join(command)}")
    return time.time() - started


def train(connector: str, models: Path, run: Path, *, seed: int, args: argparse.Namespace) -> dict:
    seconds = {}
    init = [] if connector != "hive" or args.hive_initializer_range is None else [
        "--hive_initializer_range", args.hive_initializer_range]  # fmt: skip
    if not (run / "stage3" / "hive_stage.json").is_file():
        seconds["pre-training"] = hive_train(
            "--vision_model", models / "vision", "--language_model", models / "language", "--vision_connector",
            connector, *HIVE_FLAGS, *init, "--data_format", "synthetic", "--synthetic_size", args.caption_size,
            "--synthetic_seed", seed, "--stage", "all", "--output_dir", run, "--global_batch_size", 32,
            "--per_device_train_batch_size", 32, "--seed", seed,
        )  # fmt: skip
    if not (run / "stage4" / "hive_stage.json").is_file():
        seconds["sft"] = hive_train(
            "--stage", "sft", "--data_format", "synthetic", "--synthetic_size", args.conversations,
            "--synthetic_seed", seed, "--output_dir", run, "--global_batch_size", 32,
            "--per_device_train_batch_size", 32, "--num_train_epochs", args.epochs, "--learning_rate",
            args.learning_rate, "--seed", seed,
        )  # fmt: skip
    return seconds


def first_answers(directory: Path, held_out, *, swapped: bool) -> dict[str, list[bool]]:
    """Per question type, whether the greedy first answer matches (own pictures, or the next one's)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(directory).eval()
    processor = AutoProcessor.from_pretrained(directory)
    scores: dict[str, list[bool]] = defaultdict(list)
    for index, record in enumerate(held_out.records):
        if not record.images:
            continue
        sample = held_out.swapped(index) if swapped else held_out[index]
        messages = sample["messages"]
        question, answer = messages[0], messages[1]["content"][0]["text"]
        kind = question_kind(question)
        inputs = processor.apply_chat_template(
            [question], add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        text = processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).split()
        scores[kind].append(text[: len(answer.split())] == answer.split())
    return scores


def question_kind(message: dict) -> str:
    from hive_adapter.data.conversations import QUESTIONS, SECOND_IMAGE_QUESTION

    text = " ".join(part["text"] for part in message["content"] if part["type"] == "text")
    if text == SECOND_IMAGE_QUESTION:
        return "second picture's colour"
    return next(kind for kind, phrasings in QUESTIONS.items() if text in phrasings)


def evaluate(directory: Path, seed: int, size: int) -> dict:
    from hive_adapter.data.conversations import SyntheticConversations

    held_out = SyntheticConversations(size, seed=10_000 + seed, image_size=64)
    result = {}
    for condition in ("own", "swapped"):
        scores = first_answers(directory, held_out, swapped=condition == "swapped")
        result[condition] = {kind: round(100 * sum(hits) / len(hits), 1) for kind, hits in sorted(scores.items())}
        everything = [hit for hits in scores.values() for hit in hits]
        result[condition]["all"] = round(100 * sum(everything) / len(everything), 1)
        result["count"] = {kind: len(hits) for kind, hits in sorted(scores.items())}
    return result


# The settings that must agree for runs to share one table (seeds, connectors and the init study may differ).
COMPARED = ("caption_size", "conversations", "epochs", "learning_rate", "language_steps", "vision_steps", "held_out")


def run_label(connector: str, args: argparse.Namespace) -> str:
    """The table row a run lands in: the connector, and HIVE's init when it is not the default."""
    if connector == "hive" and args.hive_initializer_range is not None:
        return f"hive (init {args.hive_initializer_range:g})"
    return connector


def command_of(args: argparse.Namespace) -> str:
    flags = [f"--seeds {args.seeds}"]
    if args.connectors != ",".join(CONNECTORS):
        flags.append(f"--connectors {args.connectors}")
    if args.hive_initializer_range is not None:
        flags.append(f"--hive_initializer_range {args.hive_initializer_range:g}")
    return "python -m benchmarks.instruct " + " ".join(flags)


def merge(previous: dict | None, args: argparse.Namespace, results: dict) -> dict:
    """`previous` (an instruct.json, or None) with `results` ({seed: {label: result}}) added; refuses runs made
    with other settings, which would not be comparable rows of one table."""
    settings = {name: getattr(args, name) for name in COMPARED}
    record = previous or {"settings": settings, "commands": [], "results": {}}
    differing = [f"{name} {settings[name]:g} (the table: {name} {record['settings'][name]:g})"
                 for name in COMPARED if record["settings"].get(name) != settings[name]]  # fmt: skip
    if differing:
        raise SystemExit(
            f"{args.output / 'instruct.json'} holds runs made with other settings: {'; '.join(differing)}; "
            "pass another --output for this run, or the table's settings to add to it"
        )
    for seed, by_label in results.items():
        record["results"].setdefault(str(seed), {}).update(by_label)
    if command_of(args) not in record.setdefault("commands", []):
        record["commands"].append(command_of(args))
    return record


def _cell(values: list[float]) -> str:
    mean = statistics.mean(values)
    return f"{mean:.1f}%" if len(values) == 1 else f"{mean:.1f}% ± {statistics.stdev(values):.1f}"


def markdown(record: dict) -> str:
    """Per run label and question type: mean ± sd over the seeds it has (own picture / swapped), and the seed
    count in its own column; then every seed's overall figure."""
    settings, results = record["settings"], record["results"]
    seeds = sorted(results, key=int)
    present = {label for by_label in results.values() for label in by_label}
    order = CONNECTORS + OTHER_CONNECTORS
    labels = [c for c in order if c in present] + sorted(present - set(order))
    kinds = sorted({kind for r in results.values() for run in r.values() for kind in run["own"]})
    kinds = ["all", *(kind for kind in kinds if kind != "all")]
    commands = "; ".join(f"`{command}`" for command in record.get("commands", []))
    lines = [
        "# Instruction tuning: answers from the picture, HIVE vs concat",
        "",
        f"{time.strftime('%Y-%m-%d')}, CPU. Commands: {commands}. Pre-training: stages 1-3 on {settings['caption_size']} synthetic captions "
        f"(Table 3 settings, batch 32); sft: {settings['conversations']} synthetic conversations x "
        f"{settings['epochs']:g} epochs, batch 32, learning rate {settings['learning_rate']:g} (every connector). "
        f"Held out: {settings['held_out']} conversations of another seed; first answers, exact match, greedy.",
        "",
        "Mean ± sd (sample) over the seeds in the `seeds` column, own picture / swapped picture:",
        "",
        "| run | seeds | " + " | ".join(kinds) + " |",
        "|---" * (len(kinds) + 2) + "|",
    ]
    for label in labels:
        runs = [results[seed][label] for seed in seeds if label in results[seed]]
        cells = [f"{_cell([r['own'][k] for r in runs])} / {_cell([r['swapped'][k] for r in runs])}" for k in kinds]
        lines.append(f"| {label} | {len(runs)} | " + " | ".join(cells) + " |")
    lines += ["", "Every seed, all questions (own / swapped):", ""]
    lines += ["| run | " + " | ".join(f"seed {seed}" for seed in seeds) + " |", "|---" * (len(seeds) + 1) + "|"]
    for label in labels:
        cells = [
            f"{results[seed][label]['own']['all']:.1f}% / {results[seed][label]['swapped']['all']:.1f}%"
            if label in results[seed] else "–"
            for seed in seeds
        ]  # fmt: skip
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Chance: colour 16.7%, shape 25%, texture 33.3%, position 20%."]
    counts = {seed: next((run["count"] for run in results[seed].values() if "count" in run), None) for seed in seeds}
    counted = [f"seed {seed}: " + ", ".join(f"{kind} {n}" for kind, n in count.items())
               for seed, count in counts.items() if count]  # fmt: skip
    if counted:
        lines += [
            "",
            "Held-out questions with pictures, per type (the same for every run of a seed): " + "; ".join(counted),
        ]
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = FullFlagParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    parser.add_argument(
        "--connectors", default=",".join(CONNECTORS),
        help=f"comma-separated, of {', '.join(CONNECTORS + OTHER_CONNECTORS)} (default hive,concat)",
    )  # fmt: skip
    parser.add_argument(
        "--hive_initializer_range", type=float, default=None,
        help="HIVE's new weights ~ N(0, this) (default: the library's, 1/sqrt(fan_in)); rows labelled 'hive (init x)'",
    )  # fmt: skip
    parser.add_argument("--caption_size", type=int, default=1000, help="synthetic captions for stages 1-3")
    parser.add_argument("--conversations", type=int, default=2000, help="synthetic conversations for sft")
    parser.add_argument("--epochs", type=float, default=3, help="sft epochs (default 3)")
    parser.add_argument("--learning_rate", type=float, default=2e-4, help="sft peak learning rate (default 2e-4)")
    parser.add_argument("--language_steps", type=int, default=300, help="toy LM pre-training steps (default 300)")
    parser.add_argument("--vision_steps", type=int, default=600, help="toy encoder pre-training steps (default 600)")
    parser.add_argument("--held_out", type=int, default=200, help="held-out conversations (default 200)")
    parser.add_argument("--work_dir", type=Path, default=Path("instruct-work"), help="models and runs (kept)")
    parser.add_argument(
        "--output", type=Path, default=OUTPUT,
        help=f"results directory (default {OUTPUT}); runs are added to the instruct.json there",
    )  # fmt: skip
    args = parser.parse_args(argv)
    unknown = [c for c in args.connectors.split(",") if c not in CONNECTORS + OTHER_CONNECTORS]
    if unknown:
        parser.error(
            f"--connectors {args.connectors!r}: {', '.join(unknown)} unknown; choose from "
            f"{','.join(CONNECTORS + OTHER_CONNECTORS)}"
        )
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {}
    for seed in seeds:
        models = prepare_models(
            args.work_dir / f"models-seed{seed}",
            seed,
            language_steps=args.language_steps,
            vision_steps=args.vision_steps,
        )
        results[seed] = {}
        for connector in args.connectors.split(","):
            label = run_label(connector, args)
            init = "" if label == connector else f"-init{args.hive_initializer_range:g}"
            run = args.work_dir / f"{connector}{init}-seed{seed}"
            seconds = train(connector, models, run, seed=seed, args=args)
            results[seed][label] = {**evaluate(run / "stage4", seed, args.held_out), "seconds": seconds}
            say(f"seed {seed} {label}: {results[seed][label]}")
    path = args.output / "instruct.json"
    record = merge(json.loads(path.read_text()) if path.is_file() else None, args, results)
    args.output.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    (args.output / "instruct.md").write_text(markdown(record))
    print(markdown(record))


if __name__ == "__main__":
    main()
