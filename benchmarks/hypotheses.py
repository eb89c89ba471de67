"""Why did small-scale HIVE not read the picture (issue #17)? The discriminating runs, as data.

    python -m benchmarks.hypotheses --conditions random,both --seeds 0,1,2      # run (finished runs are kept)
    python -m benchmarks.hypotheses --summary                                    # tables from every finished run

Every condition changes one thing against hive-reproduce's setup (tiny SigLIP-style encoder 8 x 64, tiny
Llama-style LM 4 x 96, 4000 synthetic pairs, batch 32, Table 3's three stages through `hive-train`, levels
2/4/6/8 pooled to 16 tokens into decoder layers 1-4):

- H1, pre-training of the stand-ins: none (`random`), the LM on caption text (`lm`), the encoder
  image-text contrastive (`encoder`), both (`both`), as `hive_adapter.tools.toy_pretraining` does them;
- H2, budget and learning rate: stage 1 eight times longer, every stage four times longer (the paper's
  stage-1 : stage-2 iterations are 2326 : 4652 against 125 : 250 here), HIVE's modules at 1e-3 in stages 2-3;
- H3, keys without signal: measured in every run at every stage (spread of each block's keys across
  patches, attention entropy per block, tanh of the gates);
- H4, the task: captions naming the colour only, or colour and position, instead of all four attributes;
- the HIVE initialisation planned on main (every HIVE linear layer normal(0, 0.02), zero bias: `-init002`).

Each finished run writes `<output>/runs/<condition>-seed<s>-<connector>.json` and is skipped when rerun;
`--summary` writes `<output>/hypotheses.md`. One thread per process (`OMP_NUM_THREADS=1` is set here).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from hive_adapter.utils.flags import FullFlagParser

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from transformers import HfArgumentParser  # noqa: E402

from hive_adapter.analysis.attention import attention_entropy  # noqa: E402
from hive_adapter.analysis.image_reading import checkpoint_image_reading  # noqa: E402
from hive_adapter.analysis.reproduce_measures import held_out_batch  # noqa: E402
from hive_adapter.analysis.reproduce_settings import CROSS_ATTENTION, HELD_OUT_SEED_OFFSET, HIVE_FLAGS  # noqa: E402
from hive_adapter.analysis.reproduce_work import hive_train, prepare_models, stage_report  # noqa: E402
from hive_adapter.data.synthetic import ATTRIBUTES, SyntheticShapes  # noqa: E402
from hive_adapter.model.connectors import connector_for  # noqa: E402
from hive_adapter.model.cross_attention import HiveCrossAttentionBlock  # noqa: E402
from hive_adapter.model.loading import load_hive  # noqa: E402
from hive_adapter.training import train  # noqa: E402
from hive_adapter.training.cli_arguments import ModelArguments  # noqa: E402
from hive_adapter.training.hive_flags import HiveArguments  # noqa: E402

OUTPUT = Path(__file__).parent / "results" / "reproduce" / "hypotheses"
PRETRAINED = dict(language_steps=300, vision_steps=600)  # hive-reproduce's defaults
HELD_OUT, DIAGNOSTIC_PAIRS, BATCH = 256, 64, 32


@dataclass(frozen=True)
class Condition:
    hypothesis: str
    change: str  # against hive-reproduce's setup, in words
    language_steps: int = 0
    vision_steps: int = 0
    train_size: int = 4000
    flags: tuple[str, ...] = ()  # hive-train flags for every stage
    stage1_flags: tuple[str, ...] = ()  # hive-train flags for stage 1 only
    attributes: str = ",".join(ATTRIBUTES)
    hive_init_std: float | None = None  # re-initialise HIVE's linear layers at stage 0: normal(0, std), zero bias


BOTH = dict(PRETRAINED)
CONDITIONS = {
    "random": Condition("H1", "none: random stand-ins (the setup before this issue)"),
    "lm": Condition("H1", "LM pre-trained on caption text", language_steps=PRETRAINED["language_steps"]),
    "encoder": Condition("H1", "encoder pre-trained contrastive", vision_steps=PRETRAINED["vision_steps"]),
    "both": Condition("H1", "LM and encoder pre-trained (hive-reproduce's default now)", **BOTH),
    "random-stage1x8": Condition("H2", "random stand-ins, stage 1 eight epochs", stage1_flags=("--num_train_epochs", "8")),
    "random-steps4x": Condition("H2", "random stand-ins, 4x the pairs (4x the steps of every stage)", train_size=16000),
    "random-hivelr": Condition("H2", "random stand-ins, HIVE's modules at 1e-3 in stages 2-3", flags=("--hive_learning_rate", "1e-3")),
    "both-hivelr": Condition("H2", "both pre-trained, HIVE's modules at 1e-3 in stages 2-3", flags=("--hive_learning_rate", "1e-3"), **BOTH),
    "random-colour": Condition("H4", "random stand-ins, captions name the colour only", attributes="colour"),
    "random-colour-position": Condition("H4", "random stand-ins, captions name colour and position", attributes="colour,position"),
    "both-colour-position": Condition("H4", "both pre-trained, captions name colour and position", attributes="colour,position", **BOTH),
    "random-init002": Condition("init", "random stand-ins, HIVE linears normal(0, 0.02)", hive_init_std=0.02),
    "both-init002": Condition("init", "both pre-trained, HIVE linears normal(0, 0.02)", hive_init_std=0.02, **BOTH),
    "both-init002-hivelr": Condition("init", "both pre-trained, HIVE linears normal(0, 0.02), HIVE at 1e-3 in stages 2-3", hive_init_std=0.02, flags=("--hive_learning_rate", "1e-3"), **BOTH),
}  # fmt: skip


def say(message: str) -> None:
    print(f"[hypotheses] {message}", flush=True)


# ---------------------------------------------------------------------- diagnostics (H3)
@torch.no_grad()
def key_spread(model, pixel_values: torch.Tensor) -> list[float]:
    """Per cross-attention block: how much an image's keys differ across its patches, mean over images of
    mean_j |k_j - mean k| / mean_j |k_j| (0: every patch gives the same key, nothing to attend to)."""
    levels, _ = model.hive_encode_images(pixel_values)
    blocks = [module for module in model.modules() if isinstance(module, HiveCrossAttentionBlock)]
    spreads = []
    for block, level in zip(blocks, model.hive_layers.level_of_block, strict=True):
        key, _ = block.key_values(levels[level])  # (images, kv_heads, keys, head_dim)
        key = key.transpose(1, 2).flatten(2)  # (images, keys, kv_heads * head_dim)
        spread = (key - key.mean(1, keepdim=True)).norm(dim=-1).mean(1) / key.norm(dim=-1).mean(1)
        spreads.append(float(spread.mean()))
    return spreads


def diagnostics(checkpoint: Path, held_out: SyntheticShapes, connector: str) -> dict:
    loaded = load_hive(checkpoint)
    if connector not in CROSS_ATTENTION:
        return {}
    batch = held_out_batch(loaded, held_out, DIAGNOSTIC_PAIRS)
    gates = [p.item() for n, p in loaded.model.named_parameters() if n.endswith("hive_attn_gate")]
    return {
        "key_spread": key_spread(loaded.model, batch["pixel_values"]),
        "attention_entropy": attention_entropy(loaded.model, batch).tolist(),
        "tanh_gate": [float(torch.tanh(torch.tensor(g))) for g in gates],
    }


# ---------------------------------------------------------------------- one run
def models_for(condition: Condition, seed: int, work: Path) -> Path:
    """The stand-ins of `condition`: each model random or pre-trained, shared between conditions that agree."""
    pretrained = prepare_models(work / f"models-pretrained-seed{seed}", seed=seed, **PRETRAINED)
    random = prepare_models(work / f"models-random-seed{seed}", seed=seed, language_steps=0, vision_steps=0)
    language = pretrained if condition.language_steps else random
    vision = pretrained if condition.vision_steps else random
    if language == vision:
        return language
    mixed = work / f"models-{'lm' if condition.language_steps else 'encoder'}-seed{seed}"
    if not mixed.is_dir():
        shutil.copytree(language / "language", mixed / "language")
        shutil.copytree(vision / "vision", mixed / "vision")
    return mixed


def compose_stage0(connector: str, models: Path, directory: Path, *, seed: int) -> None:
    """hive-train's stage 0 (the composed, untrained model) for `connector` with hive-reproduce's HIVE flags."""
    parser = HfArgumentParser(HiveArguments)
    (hive_args,) = parser.parse_args_into_dataclasses(args=["--vision_connector", connector, *HIVE_FLAGS])
    model_args = ModelArguments(vision_model=str(models / "vision"), language_model=str(models / "language"))
    directory.parent.mkdir(parents=True, exist_ok=True)
    train.compose_stage0(model_args, hive_args, directory, seed=seed)


@torch.no_grad()
def reinitialise_hive_linears(stage0: Path, std: float, *, seed: int) -> None:
    """Emulate the HIVE initialisation planned on main: every Linear inside HIVE's modules normal(0, std), zero
    bias; gates stay as they are (0)."""
    torch.manual_seed(seed)
    loaded = load_hive(stage0)
    for name, module in loaded.model.named_modules():
        if "hive_" in name and isinstance(module, torch.nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
    loaded.model.save_pretrained(stage0)


def run(condition_name: str, seed: int, connector: str, work: Path, output: Path) -> None:
    result_path = output / "runs" / f"{condition_name}-seed{seed}-{connector}.json"
    if result_path.is_file():
        say(f"{result_path.name}: done before, kept")
        return
    condition = CONDITIONS[condition_name]
    started = time.time()
    models = models_for(condition, seed, work)
    directory = work / "runs" / f"{condition_name}-seed{seed}-{connector}"
    common = dict(seed=seed, train_size=condition.train_size, batch_size=BATCH)
    flags = [*condition.flags, "--synthetic_attributes", condition.attributes]
    if condition.hive_init_std is not None and not (directory / "stage0-reinitialised").is_file():
        compose_stage0(connector, models, directory / "stage0", seed=seed)
        reinitialise_hive_linears(directory / "stage0", condition.hive_init_std, seed=seed)
        (directory / "stage0-reinitialised").touch()
    if condition.stage1_flags:
        hive_train(connector, models, directory, **common, flags=[*flags, *condition.stage1_flags], stages="1")
        hive_train(connector, models, directory, **common, flags=flags, stages="2,3", start=directory / "stage1")
    else:
        hive_train(connector, models, directory, **common, flags=flags)
    attributes = tuple(condition.attributes.split(","))
    held_out = SyntheticShapes(HELD_OUT, seed=HELD_OUT_SEED_OFFSET + seed, image_size=64, attributes=attributes)
    stages = {}
    for stage in (0, 1, 2, 3):
        checkpoint = directory / f"stage{stage}"
        entry = {"diagnostics": diagnostics(checkpoint, held_out, connector)}
        if stage:
            entry["image_reading"] = checkpoint_image_reading(checkpoint, held_out).to_dict()
            report = stage_report(directory, stage)
            entry.update(final_loss=report["losses"][-1], steps=report["global_steps"])
        stages[stage] = entry
    result = {
        "condition": condition_name, "settings": dataclasses.asdict(condition), "seed": seed, "connector": connector,
        "seconds": time.time() - started, "stages": stages,
        "command": f"python -m benchmarks.hypotheses --conditions {condition_name} --seeds {seed} --connectors {connector}",
    }  # fmt: skip
    result_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.write_text(json.dumps(result, indent=1))
    reading = stages[3]["image_reading"]
    say(
        f"{result_path.name}: content {reading['real']['content']:.1%} own / {reading['swapped']['content']:.1%} "
        f"swapped in {time.time() - started:.0f} s"
    )


# ---------------------------------------------------------------------- summary
def _cell(values: list[float]) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values)
    spread = f" ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else ""
    return f"{mean:.1%}{spread}"


def summary(output: Path) -> str:
    runs = [json.loads(path.read_text()) for path in sorted((output / "runs").glob("*.json"))]
    by_key: dict[tuple[str, str], list[dict]] = {}
    for result in runs:
        by_key.setdefault((result["condition"], result["connector"]), []).append(result)
    connectors = ("hive", "cascaded", "concat")
    lines = [
        "| hypothesis | condition | change | seeds | " + " | ".join(f"{c}: content own / swapped" for c in connectors)
        + " | hive: colour / shape / position, own (swapped) |",
        "|" + " --- |" * (5 + len(connectors)),
    ]  # fmt: skip
    for name, condition in CONDITIONS.items():
        cells, seeds = [], set()
        for connector in connectors:
            results = by_key.get((name, connector), [])
            seeds |= {r["seed"] for r in results}
            real = [r["stages"]["3"]["image_reading"]["real"]["content"] for r in results]
            swapped = [r["stages"]["3"]["image_reading"]["swapped"]["content"] for r in results]
            cells.append(f"{_cell(real)} / {_cell(swapped)}" if results else "–")
        if not seeds:
            continue
        hive_runs = by_key.get((name, "hive"), [])
        groups = []
        for group in ("colour", "shape", "position"):
            real = [r["stages"]["3"]["image_reading"]["real"][group] for r in hive_runs]
            swapped = [r["stages"]["3"]["image_reading"]["swapped"][group] for r in hive_runs]
            real, swapped = [v for v in real if v == v], [v for v in swapped if v == v]  # NaN: not in these captions
            groups.append(f"{statistics.fmean(real):.0%} ({statistics.fmean(swapped):.0%})" if real else "–")
        lines.append(
            f"| {condition.hypothesis} | `{name}` | {condition.change} | {','.join(map(str, sorted(seeds)))} | "
            + " | ".join(cells) + " | " + " / ".join(groups) + " |"
        )  # fmt: skip
    h3 = [
        "| condition | connector | stage | key spread per block | attention entropy per block (ln 16 = 2.77) | "
        "tanh(gate) per block | content own / swapped |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (name, connector), results in sorted(by_key.items()):
        if not connector_for(connector).uses_cross_attention or name not in (
            "random",
            "lm",
            "encoder",
            "both",
            "random-hivelr",
        ):
            continue
        for stage in ("0", "1", "2", "3"):
            diagnostics_ = [r["stages"][stage]["diagnostics"] for r in results]
            mean = {
                key: [statistics.fmean(column) for column in zip(*(d[key] for d in diagnostics_), strict=True)]
                for key in ("key_spread", "attention_entropy", "tanh_gate")
            }
            reading = [r["stages"][stage].get("image_reading") for r in results]
            content = (
                f"{_cell([x['real']['content'] for x in reading])} / {_cell([x['swapped']['content'] for x in reading])}"
                if reading[0]
                else "–"
            )
            h3.append(
                f"| `{name}` | {connector} | {stage} | "
                + " | ".join(" ".join(f"{v:.2f}" for v in mean[key]) for key in ("key_spread", "attention_entropy", "tanh_gate"))
                + f" | {content} |"
            )  # fmt: skip
    return (
        "# Hypothesis runs (issue #17)\n\nGenerated by `python -m benchmarks.hypotheses --summary` from "
        f"{len(runs)} finished runs in `runs/`. Content: teacher-forced top-1 on held-out colour, texture, shape and "
        "position tokens after stage 3; own image vs the next sample's image (the control). Mean ± standard "
        "deviation over seeds.\n\n" + "\n".join(lines) + "\n\n## H3: keys, attention and gates per stage "
        "(mean over seeds)\n\n" + "\n".join(h3) + "\n"
    )


def main(argv: list[str] | None = None) -> None:
    parser = FullFlagParser(
        prog="python -m benchmarks.hypotheses", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )  # fmt: skip
    parser.add_argument("--conditions", default="", help=f"comma-separated, of: {', '.join(CONDITIONS)}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--connectors", default="hive,cascaded,concat")
    parser.add_argument("--work_dir", type=Path, default=Path("/tmp/hive-hypotheses"), help="checkpoints (kept)")
    parser.add_argument("--output_dir", type=Path, default=OUTPUT)
    parser.add_argument("--summary", action="store_true", help="write hypotheses.md from the finished runs")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    conditions = [name for name in args.conditions.split(",") if name]
    unknown = sorted(set(conditions) - set(CONDITIONS))
    if unknown:
        parser.error(f"--conditions: unknown {unknown}; choose from {', '.join(CONDITIONS)}")
    for condition in conditions:
        for seed in [int(s) for s in args.seeds.split(",")]:
            for connector in args.connectors.split(","):
                run(condition, seed, connector, args.work_dir, args.output_dir)
    if args.summary:
        (args.output_dir / "hypotheses.md").write_text(summary(args.output_dir))
        say(f"written {args.output_dir / 'hypotheses.md'}")
    elif not conditions:
        sys.exit(parser.format_usage() + "give --conditions and/or --summary")


if __name__ == "__main__":
    main()
