"""Instruction tuning, measured: after `hive-train --stage sft`, does the model answer from the picture?

    python -m benchmarks.instruct                      # hive and concat, seed 0 (~15 min on 2 cores)
    python -m benchmarks.instruct --seeds 0,1 --work_dir /tmp/instruct

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
CONNECTORS = ("hive", "concat")
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
    if not (run / "stage3" / "hive_stage.json").is_file():
        seconds["pre-training"] = hive_train(
            "--vision_model", models / "vision", "--language_model", models / "language", "--vision_connector",
            connector, *HIVE_FLAGS, "--data_format", "synthetic", "--synthetic_size", args.caption_size,
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
    return result


def markdown(results: dict, args: argparse.Namespace) -> str:
    lines = [
        "# Instruction tuning: answers from the picture, HIVE vs concat",
        "",
        f"{time.strftime('%Y-%m-%d')}, CPU. Command: `python -m benchmarks.instruct --seeds {args.seeds}`. Pre-training: "
        f"stages 1-3 on {args.caption_size} synthetic captions (Table 3 settings, batch 32); sft: "
        f"{args.conversations} synthetic conversations x {args.epochs} epochs, batch 32, learning rate "
        f"{args.learning_rate:g} (both connectors). Held out: {args.held_out} conversations of another seed; "
        "first answers, exact match, greedy; mean over seeds (own picture / swapped picture).",
        "",
    ]
    kinds = sorted({k for per_seed in results.values() for r in per_seed.values() for k in r["own"]})
    lines += ["| connector | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
    for connector in CONNECTORS:
        cells = []
        for kind in kinds:
            own = statistics.mean(r[connector]["own"][kind] for r in results.values())
            swapped = statistics.mean(r[connector]["swapped"][kind] for r in results.values())
            cells.append(f"{own:.1f}% / {swapped:.1f}%")
        lines.append(f"| {connector} | " + " | ".join(cells) + " |")
    lines += ["", "Chance: colour 16.7%, shape 25%, texture 33.3%, position 20%.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = FullFlagParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    parser.add_argument("--caption_size", type=int, default=1000, help="synthetic captions for stages 1-3")
    parser.add_argument("--conversations", type=int, default=2000, help="synthetic conversations for sft")
    parser.add_argument("--epochs", type=float, default=3, help="sft epochs (default 3)")
    parser.add_argument("--learning_rate", type=float, default=2e-4, help="sft peak learning rate (default 2e-4)")
    parser.add_argument("--language_steps", type=int, default=300, help="toy LM pre-training steps (default 300)")
    parser.add_argument("--vision_steps", type=int, default=600, help="toy encoder pre-training steps (default 600)")
    parser.add_argument("--held_out", type=int, default=200, help="held-out conversations (default 200)")
    parser.add_argument("--work_dir", type=Path, default=Path("instruct-work"), help="models and runs (kept)")
    parser.add_argument("--output", type=Path, default=OUTPUT, help=f"results directory (default {OUTPUT})")
    args = parser.parse_args(argv)
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
        for connector in CONNECTORS:
            run = args.work_dir / f"{connector}-seed{seed}"
            seconds = train(connector, models, run, seed=seed, args=args)
            results[seed][connector] = {**evaluate(run / "stage4", seed, args.held_out), "seconds": seconds}
            say(f"seed {seed} {connector}: {results[seed][connector]}")
    args.output.mkdir(parents=True, exist_ok=True)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    (args.output / "instruct.json").write_text(json.dumps({"settings": settings, "results": results}, indent=2))
    (args.output / "instruct.md").write_text(markdown(results, args))
    print(markdown(results, args))


if __name__ == "__main__":
    main()
