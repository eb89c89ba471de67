"""`hive-reproduce`: the paper's comparison (HIVE vs cascaded vs concat) rerun small, on a CPU.

    hive-reproduce --output_dir benchmarks/results/reproduce          # 3 seeds, under 30 min on 2 cores
    hive-reproduce --quick --output_dir /tmp/reproduce                # 1 seed, smaller sets, under 5 min

Per seed, a tiny vision encoder (SigLIP-style, 8 layers) and language model (Llama-style, 4 layers) are
built and pre-trained the way real checkpoints come (the LM on caption text, the encoder image-text
contrastive: `hive_adapter.tools.toy_pretraining`), then pre-trained with HIVE's three stages (Table 3,
`hive-train`) three ways from that same start, with the same data and budget:

- `hive`: levels from layers 2, 4, 6, 8 feed decoder layers 1-4 through gated cross-attention;
- `cascaded`: the same cross-attention, every decoder layer fed the deepest level only;
- `concat`: the deepest level's tokens spliced into the LM's input (the self-attention baseline).
- `deepstack` (by `--connectors`): concat's splice, and the shallower levels added to the first decoder layers'
  hidden states at the image tokens (Qwen3-VL's DeepStack).

Then, for each connector (mean and spread over the seeds):
- image reading: held-out caption-token accuracy on content words (colour, texture, shape, position)
  with each sample's own image and with the next sample's (the control), and on structural words;
- the encoder (the paper's title claim): linear probes at every encoder layer and at its output
  (synthetic shapes, scikit-learn's digits, and `shades`, a fine-grained set no connector trains on) of
  the exported encoder against the encoder it started from, and each layer's weight change, under two
  stage-3 budgets: Table 3's, and one that moves the encoder (stage 3 rerun from the same stage-2
  checkpoint with `--vision_learning_rate` and more epochs: `hive_adapter.analysis.encoder_quality`);
- the caption loss's gradient at every encoder layer (stage-2 checkpoints: what stage 3 trains the
  encoder with), relative to its gradient at the LM's text input embeddings (comparable across
  connectors whatever their loss scale), and the share of it on the captioned object;
- the entropy of each cross-attention block over the image's keys (hive, cascaded);
- FLOPs and time of one training step;
- sample efficiency: learning curves (held-out accuracy with own and swapped pictures vs step) of tiny
  models trained whole on image-only tasks, steps to 90% and 95% (`hive_adapter.analysis.learning_curves`).
Writes `reproduce.json`, `reproduce.md` and PNGs; prints the tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

from ..data.collator import HiveCaptionCollator
from ..data.synthetic import SyntheticShapes
from ..model.loading import load_hive
from ..tools.toy_models import ToySizes
from ..utils.console import quiet_progress_bars
from ..utils.console import say as console_say
from ..utils.flags import FullFlagParser
from ..utils.outputs import write_file
from . import encoder_quality, learning_curves
from .probe import ProbeConfig
from .reproduce_measures import measure_encoders, measure_reading, step_costs
from .reproduce_report import (
    CURVES_DIR,
    markdown_tables,
    moving_label,
    render_markdown,
    write_figures,
)
from .reproduce_settings import (
    COMMAND,
    CONNECTORS,
    FULL,
    HELD_OUT_SEED_OFFSET,
    PROBE,
    PROBE_TASKS,
    QUICK,
    VARIANTS,
    Budget,
)
from .reproduce_work import (
    check_output_dir,
    claim_work_dir,
    hive_train,
    prepare_models,
    work_settings,
)

say = partial(console_say, COMMAND)


def report_only(out: Path) -> None:
    """Rewrite `out/reproduce.md` from `out/reproduce.json` (an earlier hive-reproduce run's); nothing is trained."""
    try:
        report = json.loads((out / "reproduce.json").read_text())
    except (OSError, ValueError) as error:
        raise SystemExit(
            f"[{COMMAND}] error: --report_only needs {out / 'reproduce.json'} from an earlier {COMMAND} run ({error})"
        ) from None
    if not str(report.get("command", "")).startswith(COMMAND) or "encoder_quality" not in report:
        raise SystemExit(
            f"[{COMMAND}] error: {out / 'reproduce.json'} was not written by this version of {COMMAND} (no "
            "encoder_quality); run it again"
        )
    write_file(out / "reproduce.md", lambda path: path.write_text(render_markdown(report)))
    say(f"re-rendered {out / 'reproduce.md'} from {out / 'reproduce.json'}")


# ---------------------------------------------------------------------- main
def parse_arguments(argv: list[str] | None) -> tuple[argparse.Namespace, Budget, list[str]]:
    parser = FullFlagParser(
        prog="hive-reproduce", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )  # fmt: skip
    parser.add_argument("--output_dir", type=Path, default=Path("hive_reproduce"), help="results: JSON, markdown, PNGs")
    parser.add_argument(
        "--work_dir",
        type=Path,
        default=None,
        help="checkpoints (kept, and reused on a rerun); default: a temporary one",
    )
    parser.add_argument(
        "--report_only",
        action="store_true",
        help="re-render reproduce.md from --output_dir's reproduce.json; train nothing",
    )
    parser.add_argument("--quick", action="store_true", help="the small budget: 1 seed, smaller sets (under 5 min)")
    parser.add_argument("--seeds", default=None, help=f"comma-separated (default {','.join(map(str, FULL.seeds))})")
    sizes = {
        "train_size": "synthetic pre-training pairs per seed",
        "held_out_size": "held-out pairs for image reading",
        "gradient_samples": "held-out pairs the gradient norms and attention entropies average over",
        "probe_size": "training images of the shapes probe",
        "probe_epochs": "linear-probe epochs",
        "language_pretraining_steps": "text-only steps of the toy LM before the stages (0: random LM)",
        "vision_pretraining_steps": "contrastive steps of the toy encoder before the stages (0: random encoder)",
        "curve_steps": "steps of each learning curve (0: no learning curves)",
    }
    for name, text in sizes.items():
        parser.add_argument(
            f"--{name}",
            type=int,
            default=None,
            help=f"{text} (default {getattr(FULL, name)}, --quick {getattr(QUICK, name)})",
        )
    parser.add_argument(
        "--moving_vision_learning_rate", type=float, default=None,
        help=f"the encoder's peak rate in the stage-3 budget that moves it (default {FULL.moving_vision_learning_rate})",
    )  # fmt: skip
    parser.add_argument(
        "--moving_stage3_epochs", type=float, default=None,
        help=f"epochs of that stage 3 (default {FULL.moving_stage3_epochs}, --quick {QUICK.moving_stage3_epochs})",
    )  # fmt: skip
    parser.add_argument(
        "--curve_tasks", default=None,
        help=f"learning-curve tasks, of {','.join(learning_curves.TASKS)} (default all, --quick colour)",
    )  # fmt: skip
    parser.add_argument("--batch_size", type=int, default=32, help="global batch of every stage (default 32)")
    parser.add_argument(
        "--hive_learning_rate", type=float, default=None, help="hive-train's option (default: Table 3's rates)"
    )
    parser.add_argument(
        "--connectors",
        default=",".join(CONNECTORS),
        help=f"comma-separated, of {','.join(VARIANTS)} (default {','.join(CONNECTORS)})",
    )
    args = parser.parse_args(argv)
    connectors = [name.strip() for name in args.connectors.split(",") if name.strip()]
    if sorted(set(connectors) - set(VARIANTS)) or not connectors:
        parser.error(f"--connectors {args.connectors!r}: choose from {','.join(VARIANTS)}")
    profile = QUICK if args.quick else FULL
    overrides = {name: getattr(args, name) for name in sizes if getattr(args, name) is not None}
    if args.seeds is not None:
        try:
            overrides["seeds"] = tuple(int(seed) for seed in args.seeds.split(","))
        except ValueError:
            parser.error(f"--seeds {args.seeds!r}: expected comma-separated integers such as 0,1,2")
    for name in ("moving_vision_learning_rate", "moving_stage3_epochs"):
        value = getattr(args, name)
        if value is not None:
            if not (value > 0 and value < float("inf")):
                parser.error(f"--{name} {value}: must be a positive number")
            overrides[name] = value
    if args.curve_tasks is not None:
        tasks = tuple(name.strip() for name in args.curve_tasks.split(",") if name.strip())
        if not tasks or set(tasks) - set(learning_curves.TASKS):
            parser.error(f"--curve_tasks {args.curve_tasks!r}: choose from {','.join(learning_curves.TASKS)}")
        overrides["curve_tasks"] = tasks
    budget = dataclasses.replace(profile, **overrides)
    for name in ("train_size", "held_out_size", "gradient_samples", "probe_size", "probe_epochs"):
        if getattr(budget, name) < 1:
            parser.error(f"--{name} {getattr(budget, name)}: must be at least 1")
    if budget.curve_steps < 0:
        parser.error(f"--curve_steps {budget.curve_steps}: must be 0 (no learning curves) or more")
    if args.batch_size < 1 or budget.held_out_size < 2:
        parser.error("--batch_size must be at least 1 and --held_out_size at least 2 (the swapped-image control)")
    return args, budget, connectors


def main(argv: list[str] | None = None) -> None:
    quiet_progress_bars(reloads_models=True)
    args, budget, connectors = parse_arguments(argv)
    if args.report_only:
        report_only(args.output_dir)
        return
    probe_config = ProbeConfig(epochs=budget.probe_epochs, **PROBE)
    flags = [] if args.hive_learning_rate is None else ["--hive_learning_rate", str(args.hive_learning_rate)]
    started = time.time()
    timings: dict[str, float] = {}
    out = args.output_dir
    check_output_dir(out)
    temporary = None
    work = args.work_dir
    if work is None:
        temporary = tempfile.mkdtemp(prefix="hive-reproduce-")
        work = Path(temporary)
    claim_work_dir(work, work_settings(args, budget))
    out.mkdir(parents=True, exist_ok=True)
    image_size = ToySizes().image_size
    seeds = budget.seeds

    def phase(name: str, since: float) -> float:
        timings[name] = time.time() - since
        return time.time()

    try:
        clock = time.time()
        say(
            f"1/7 tiny models per seed {list(seeds)}, pre-trained: LM {budget.language_pretraining_steps} text steps, "
            f"encoder {budget.vision_pretraining_steps} contrastive steps"
        )
        models = {
            seed: prepare_models(
                work / f"seed{seed}" / "models", seed=seed, language_steps=budget.language_pretraining_steps,
                vision_steps=budget.vision_pretraining_steps,
            )
            for seed in seeds
        }  # fmt: skip
        clock = phase("pretraining", clock)

        say(f"2/7 stages 1-3 of {', '.join(connectors)}: {budget.train_size} pairs, batch {args.batch_size}")
        runs = {seed: {c: work / f"seed{seed}" / c for c in connectors} for seed in seeds}
        for seed in seeds:
            for name in connectors:
                connector, variant_flags = VARIANTS[name]
                hive_train(
                    connector, models[seed], runs[seed][name], seed=seed, train_size=budget.train_size,
                    batch_size=args.batch_size, flags=[*variant_flags, *flags], label=name,
                )  # fmt: skip
        moving = moving_label(budget)
        say(f"   stage 3 again from each stage-2 checkpoint, the budget that moves the encoder: {moving}")
        moved = {seed: {c: work / f"seed{seed}" / f"{c}-moving-stage3" for c in connectors} for seed in seeds}
        moving_flags = [
            "--vision_learning_rate", str(budget.moving_vision_learning_rate),
            "--num_train_epochs", str(budget.moving_stage3_epochs),
        ]  # fmt: skip
        for seed in seeds:
            for name in connectors:
                hive_train(
                    VARIANTS[name][0], models[seed], moved[seed][name], seed=seed, train_size=budget.train_size,
                    batch_size=args.batch_size, flags=[*flags, *moving_flags], stages="3",
                    start=runs[seed][name] / "stage2", label=f"{name}, moving stage 3",
                )  # fmt: skip
        clock = phase("training", clock)

        say(
            f"3/7 the encoder: linear probes at every layer ({', '.join(PROBE_TASKS)}) of each exported encoder and "
            "the encoder it started from; weight change per layer"
        )
        results, start_probe, encoder_study = measure_encoders(
            runs, moved, connectors, seeds, budget=budget, probe_config=probe_config, moving=moving
        )
        clock = phase("probes", clock)

        say("4/7 image reading (own vs swapped image), gradients into the encoder, attention entropy")
        held_out = {
            seed: SyntheticShapes(budget.held_out_size, seed=HELD_OUT_SEED_OFFSET + seed, image_size=image_size)
            for seed in seeds
        }
        profiles = measure_reading(runs, connectors, held_out, budget, results)
        clock = phase("evaluation", clock)

        say("5/7 FLOPs and time of one training step (all parameters training)")
        first = load_hive(runs[seeds[0]][connectors[0]] / "stage0")
        train_set = SyntheticShapes(args.batch_size, seed=seeds[0], image_size=image_size)
        sample_batch = HiveCaptionCollator(first.tokenizer, first.image_processor)(
            [train_set[i] for i in range(len(train_set))]
        )
        costs = step_costs({c: runs[seeds[0]][c] / "stage0" for c in connectors}, sample_batch)
        for connector, cost in costs.items():
            results[connector].update(
                gflops=cost["gflops"], gflops_without_tower=cost["gflops_without_tower"], ms_per_step=cost["ms"]
            )
        clock = phase("costs", clock)

        curves = None
        if budget.curve_steps:
            names = [c for c in connectors if c in learning_curves.CONNECTORS]
            say(
                f"6/7 learning curves: {', '.join(names)} on {', '.join(budget.curve_tasks)}, {budget.curve_steps} "
                f"steps each, seeds {list(seeds)} (finished runs in {out / CURVES_DIR / 'runs'} are kept)"
            )
            curve_runs = [
                learning_curves.CurveRun(task=task, connector=name, seed=seed, steps=budget.curve_steps)
                for task in budget.curve_tasks for seed in seeds for name in names
            ]  # fmt: skip
            finished = learning_curves.run_all(curve_runs, out / CURVES_DIR, say=say)
            curves = learning_curves.write_summary(finished, out / CURVES_DIR, budget.curve_steps)
            clock = phase("learning curves", clock)

        say("7/7 figures")
        figures = write_figures(out, results, profiles, held_out[seeds[0]], {c: runs[seeds[0]][c] for c in connectors})
        figures.append(encoder_quality.plot_layer_gains(encoder_study, out / "encoder_probe_layers.png").name)
        phase("figures", clock)
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)

    command = "hive-reproduce " + " ".join(argv if argv is not None else sys.argv[1:])
    tables = markdown_tables(results, start_probe)
    import transformers

    environment = {
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "machine": platform.machine(), "cpu_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip
    seconds = time.time() - started
    report = (
        json.dumps(
            {
                "command": command,
                "environment": environment,
                "seconds": seconds,
                "timings": timings,
                "budget": dataclasses.asdict(budget),
                "settings": vars(args) | {"output_dir": str(out), "work_dir": str(args.work_dir)},
                "probe_recipe": vars(probe_config),
                "start_probe": start_probe,
                "results": results,
                "encoder_quality": encoder_study,
                "learning_curves": curves,
                "figures": figures,
            },
            indent=2,
            default=str,
        )  # fmt: skip
    )
    write_file(out / "reproduce.json", lambda path: path.write_text(report))
    markdown = render_markdown(json.loads(report))
    write_file(out / "reproduce.md", lambda path: path.write_text(markdown))
    print("\n" + tables + "\n")
    print("\n".join(encoder_study["verdicts"]) + "\n")
    say(f"written: {out / 'reproduce.json'}, {out / 'reproduce.md'}, " + ", ".join(figures))
    say(f"finished in {seconds / 60:.1f} min (" + ", ".join(f"{k} {v / 60:.1f}" for k, v in timings.items()) + ")")


if __name__ == "__main__":
    main()
