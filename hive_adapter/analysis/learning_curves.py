"""Sample efficiency: how many steps each connector needs to read a picture (issue 25's learning curves).

    python -m hive_adapter.analysis.learning_curves --output_dir benchmarks/results/reproduce/learning_curves
    python -m hive_adapter.analysis.learning_curves --variants default,gate0.1 --tasks colour --summary_only

Image-only tasks where one answer token is decided by the picture alone (a text prior is at chance):

- `colour`: a square of one of 8 colours at a random spot; the answer is its colour;
- `position`: the same pictures; the answer is the square's quadrant (the colour is a distractor);
- `shape`: a square, circle, triangle or cross of a random colour at a random spot;
- `texture`: a patch filled solid, striped, dotted or checked, random colour and spot;
- `digits`: one of scikit-learn's handwritten digits (real scans) at a random spot; train and held-out
  pictures are different scans.

Each connector (hive, hive_lean, cascaded, concat, deepstack) is the real `HiveForConditionalGeneration` over a tiny
SigLIP tower (4 layers x 64) and a tiny Llama (2 layers x 64), trained whole (AdamW, lr 1e-3, batch 32)
from the same seeded start; every `eval_every` steps its held-out accuracy is measured with each sample's
own picture and with the next sample's (the control). A curve's steps-to-X% is the first evaluation at or
above X% with the own picture.

Variants change one thing against the default to find why a connector is slower (`VARIANTS`): the
gates' starting value, the scale of HIVE's new weights, the learning rate of HIVE's modules, a gated
feed-forward after each cross-attention.
Each finished (variant, task, connector, seed) run is written to `<output_dir>/runs/` and skipped when
rerun; `curves.md`, `curves.json` and `learning_curves.png` summarise every finished run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..utils.console import say as console_say
from ..utils.flags import FullFlagParser
from ..utils.outputs import write_file
from .curve_report import markdown, plot_curves, ratio_to_concat, summarise
from .curve_runs import (
    ANSWERS,
    BOS,
    CONNECTOR_SETTINGS,
    CONNECTORS,
    IMAGE,
    PAD,
    PATCH,
    TASKS,
    THRESHOLDS,
    VARIANTS,
    VOCAB,
    CurveRun,
    Variant,
    image_task,
)

COMMAND = "hive-learning-curves"


# ---------------------------------------------------------------------- the model and its training
def tiny_model(connector: str, seed: int, variant: Variant = VARIANTS["default"]):
    """The real HiveForConditionalGeneration over a tiny SigLIP tower and a tiny Llama, seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM, SiglipVisionConfig, SiglipVisionModel

    from ..model.config import HiveConfig
    from ..model.modeling_hive import HiveForConditionalGeneration

    if connector not in CONNECTORS:
        raise ValueError(f"connector={connector!r}: choose from {', '.join(CONNECTORS)}")
    torch.manual_seed(seed)
    vision = SiglipVisionModel(
        SiglipVisionConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, image_size=IMAGE,
            patch_size=PATCH,
        )
    )  # fmt: skip
    language = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=BOS, eos_token_id=PAD, pad_token_id=PAD,
        )
    )  # fmt: skip
    config = HiveConfig(
        vision_layers=[1, 3],
        llm_layers=[0, 1],
        **CONNECTOR_SETTINGS[connector],
        **variant.config,
    )  # fmt: skip  (16 patch tokens a level)
    model = HiveForConditionalGeneration.from_vision_text(vision, language, config)
    if variant.zero_output_projection:
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name.endswith("hive_o_proj.weight"):
                    parameter.zero_()
    return model


def _rows(data: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
    return {name: tensor[index] for name, tensor in data.items()}


@torch.no_grad()
def answer_accuracy(model, data: dict[str, torch.Tensor], chunk: int = 256) -> float:
    """Share of samples whose top-1 prediction at the question token is the answer."""
    from .captioning import aligned_logits

    was_training = model.training
    model.eval()
    right = 0
    for start in range(0, len(data["input_ids"]), chunk):
        part = {name: tensor[start : start + chunk] for name, tensor in data.items()}
        predicted = aligned_logits(model, part)[:, 1].argmax(-1)  # position 1 predicts the answer
        right += int((predicted == part["input_ids"][:, 2]).sum())
    model.train(was_training)
    return right / len(data["input_ids"])


def steps_to(curve: list[tuple[int, float]], threshold: float) -> int | None:
    """The first evaluated step whose accuracy is at least `threshold`, or None if the curve never gets there."""
    return next((step for step, accuracy in curve if accuracy >= threshold), None)


def train_curve(run: CurveRun) -> dict:
    """Train one connector on one task from its seeded start; the held-out curves with own and swapped pictures."""
    variant = VARIANTS[run.variant]
    model = tiny_model(run.connector, run.seed, variant)
    train = image_task(run.task, run.train_size, seed=run.seed)
    held_out = image_task(run.task, run.held_out_size, seed=10_000 + run.seed, held_out=True)
    swapped = {**held_out, "pixel_values": held_out["pixel_values"].roll(-1, 0)}  # sample i sees picture i + 1
    hive_parameters = [p for name, p in model.named_parameters() if ".hive_" in name or name.startswith("hive_")]
    others = [p for name, p in model.named_parameters() if not (".hive_" in name or name.startswith("hive_"))]
    optimizer = torch.optim.AdamW(
        [{"params": others}, {"params": hive_parameters, "lr": run.learning_rate * variant.hive_lr_factor}],
        lr=run.learning_rate,
        weight_decay=0.0,
    )
    order = torch.Generator().manual_seed(run.seed + 1)
    own, control, losses = [(0, answer_accuracy(model, held_out))], [(0, answer_accuracy(model, swapped))], []
    started = time.time()
    model.train()
    for step in range(1, run.steps + 1):
        batch = _rows(train, torch.randint(0, run.train_size, (run.batch_size,), generator=order))
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % run.eval_every == 0 or step == run.steps:
            own.append((step, answer_accuracy(model, held_out)))
            control.append((step, answer_accuracy(model, swapped)))
    return {
        "run": asdict(run),
        "hive_parameters": sum(p.numel() for p in hive_parameters),
        "chance": 1 / ANSWERS[run.task],
        "own": own,
        "swapped": control,
        "loss_every_25": [statistics.fmean(losses[i : i + 25]) for i in range(0, len(losses), 25)],
        "steps_to": {f"{threshold:.0%}": steps_to(own, threshold) for threshold in THRESHOLDS},
        "seconds": time.time() - started,
    }


# ---------------------------------------------------------------------- command line
def run_all(runs: list[CurveRun], directory: Path, *, say=None) -> list[dict]:
    """Train every run not finished in `directory/runs/` (one JSON per run); return every run's result."""
    say = say or (lambda text: console_say(COMMAND, text))
    (directory / "runs").mkdir(parents=True, exist_ok=True)
    results = []
    for index, run in enumerate(runs, 1):
        path = directory / "runs" / f"{run.name}.json"
        if path.is_file():
            try:
                recorded = json.loads(path.read_text())
                same = recorded["run"] == asdict(run)
            except (ValueError, KeyError, TypeError):
                recorded, same = None, False
                say(f"{path} is not a finished run's record (unreadable): training it again")
            if same:
                results.append(recorded)
                continue
            if recorded is not None:
                say(f"{path.name} was trained with other settings: training it again")
        result = train_curve(run)
        write_file(path, lambda tmp, result=result: tmp.write_text(json.dumps(result, indent=1)))
        say(
            f"[{index}/{len(runs)}] {run.name}: 90% at {result['steps_to']['90%']}, 95% at {result['steps_to']['95%']}"
            f", final own {result['own'][-1][1]:.1%} / swapped {result['swapped'][-1][1]:.1%} "
            f"({result['seconds']:.0f} s)"
        )
        results.append(result)
    return results


def write_summary(results: list[dict], directory: Path, steps: int) -> dict:
    table = summarise(results)
    summary = {"table": table, "ratio_to_concat_90": ratio_to_concat(table, steps, "90%"),
               "ratio_to_concat_95": ratio_to_concat(table, steps, "95%")}  # fmt: skip
    write_file(directory / "curves.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=1)))
    write_file(directory / "curves.md", lambda tmp: tmp.write_text(markdown(table, steps)))
    plot_curves(results, directory / "learning_curves.png")
    return summary


def _names(value: str, allowed, flag: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in allowed]
    if unknown or not names:
        raise SystemExit(f"[{COMMAND}] error: {flag} {value!r}: choose from {', '.join(allowed)}")
    return names


def main(argv: list[str] | None = None) -> None:
    import os

    parser = FullFlagParser(
        prog=COMMAND, description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )  # fmt: skip
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--connectors", default=",".join(CONNECTORS))
    parser.add_argument("--variants", default="default", help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=CurveRun.steps)
    parser.add_argument("--eval_every", type=int, default=CurveRun.eval_every)
    parser.add_argument("--summary_only", action="store_true", help="summarise the finished runs, train nothing")
    args = parser.parse_args(argv)
    if args.output_dir.exists() and not args.output_dir.is_dir():
        parser.error(f"--output_dir {args.output_dir} is a file; give a directory")
    if args.steps < 1 or args.eval_every < 1:
        parser.error(f"--steps {args.steps} and --eval_every {args.eval_every} must be at least 1")
    try:
        seeds = [int(seed) for seed in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds {args.seeds!r}: expected comma-separated integers such as 0,1,2")
    tasks = _names(args.tasks, TASKS, "--tasks")
    connectors = _names(args.connectors, CONNECTORS, "--connectors")
    variants = _names(args.variants, VARIANTS, "--variants")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    runs = [
        CurveRun(task=t, connector=c, seed=s, variant=v, steps=args.steps, eval_every=args.eval_every)
        for v in variants for t in tasks for s in seeds for c in connectors
    ]  # fmt: skip
    if args.summary_only:
        results = []
        for path in sorted((args.output_dir / "runs").glob("*.json")):
            try:
                results.append(json.loads(path.read_text()))
            except ValueError:
                console_say(COMMAND, f"skipping {path}: not a finished run's record (unreadable)")
        if not results:
            parser.error(f"--summary_only: no finished runs in {args.output_dir / 'runs'}")
    else:
        console_say(COMMAND, f"{len(runs)} runs ({args.steps} steps each) into {args.output_dir}")
        results = run_all(runs, args.output_dir)
    limit = max(result["run"]["steps"] for result in results)  # what the runs were trained for, not the flag's default
    write_summary(results, args.output_dir, limit)
    print(markdown(summarise(results), limit))


if __name__ == "__main__":
    main()
