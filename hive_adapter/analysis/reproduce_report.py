"""What `hive-reproduce` writes: seed summaries, the markdown tables and report, the figures."""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from ..data.synthetic import PROMPT, SyntheticShapes
from ..model.loading import load_hive
from . import encoder_quality, learning_curves
from .attention import cross_attention_maps
from .captioning import caption_batch
from .plots import plot_attention_maps, plot_gradient_maps, plot_image_reading, plot_layer_curves
from .reproduce_settings import Budget
from .seed_statistics import mean_and_spread

CURVES_DIR = "learning_curves"  # under --output_dir: one JSON per finished curve (reused on a rerun), tables, plot


def elementwise_mean(rows: list[list[float]]) -> list[float]:
    return [statistics.fmean(column) for column in zip(*rows, strict=True)]


def summarise_readings(readings: list[dict]) -> dict:
    """Image readings of several seeds -> {"real"|"swapped"|"image_dependent": {group: mean/sd/values}}."""
    return {
        kind: {group: mean_and_spread([reading[kind][group] for reading in readings]) for group in readings[0][kind]}
        for kind in ("real", "swapped", "image_dependent")
    }


def percent_over_seeds(summary: dict) -> str:
    """`87.6% ± 1.3` (the spread in points), or `87.6%` for one seed."""
    text = f"{summary['mean']:.1%}"
    return text if len(summary["values"]) == 1 else f"{text} ± {100 * summary['sd']:.1f}"


def markdown_tables(results: dict, start_probe: dict) -> str:
    """The main table, the per-attribute table and the per-stage table."""
    main = [
        "| connector | content, own image | content, swapped image | image-dependent (own - swapped) | structural "
        "(own / swapped) | probe shapes | probe digits | grad layer 1 / text input | grad layer 8 / text input | "
        "attention entropy per block (uniform: ln 16 = 2.77) | tanh(gate) per block | GFLOPs / step (without the "
        "tower) | ms / step |",
        "|" + " --- |" * 13,
        f"| encoder it started from | | | | | {percent_over_seeds(start_probe['shapes'])} | {percent_over_seeds(start_probe['digits'])} |"
        + " |" * 6,
    ]
    for connector, row in results.items():
        reading = row["image_reading"]
        relative = row["gradients"]["relative_grad_norm"]
        entropy = row.get("cross_attention")
        main.append(
            f"| {connector} | {percent_over_seeds(reading['real']['content'])} | {percent_over_seeds(reading['swapped']['content'])} | "
            f"{percent_over_seeds(reading['image_dependent']['content'])} | {reading['real']['structural']['mean']:.1%} / "
            f"{reading['swapped']['structural']['mean']:.1%} | {percent_over_seeds(row['probe']['shapes'])} | "
            f"{percent_over_seeds(row['probe']['digits'])} | {relative[0]:.3g} | {relative[-1]:.3g} | "
            + (
                " ".join(f"{value:.2f}" for value in entropy["attention_entropy"])
                + " | "
                + " ".join(f"{value:+.2f}" for value in entropy["tanh_gate"])
                if entropy
                else "– | –"
            )
            + f" | {row['gflops']:.2f} ({row['gflops_without_tower']:.2f}) | {row['ms_per_step']:.0f} |"
        )
    groups = ("colour", "texture", "shape", "position")
    attributes = [
        "| connector | " + " | ".join(f"{group}: own / swapped" for group in groups) + " |",
        "|" + " --- |" * (len(groups) + 1),
    ]
    for connector, row in results.items():
        reading = row["image_reading"]
        attributes.append(
            f"| {connector} | "
            + " | ".join(
                f"{reading['real'][group]['mean']:.1%} / {reading['swapped'][group]['mean']:.1%}" for group in groups
            )
            + " |"
        )
    stages = [
        "| connector | content own / swapped after stage 1 | after stage 2 | after stage 3 |",
        "| --- | --- | --- | --- |",
    ]
    for connector, row in results.items():
        cells = [
            f"{by_stage['real']['content']['mean']:.1%} / {by_stage['swapped']['content']['mean']:.1%}"
            for by_stage in row["image_reading_by_stage"].values()
        ]
        stages.append(f"| {connector} | " + " | ".join(cells) + " |")
    return "\n".join(main) + "\n\n" + "\n".join(attributes) + "\n\n" + "\n".join(stages)


def report_markdown(command, environment, seconds, timings, budget: Budget, tables, results, figures) -> str:
    seeds = ", ".join(map(str, budget.seeds))
    area = next(iter(results.values()))["object_area"]
    return (
        f"# hive-reproduce\n\n`{command}` ({seconds / 60:.1f} min: "
        + ", ".join(f"{name} {value / 60:.1f}" for name, value in timings.items())
        + f"; {environment['date']}, {environment['machine']}, {environment['cpu_threads']} CPU threads, torch "
        f"{environment['torch']}, transformers {environment['transformers']}; times are indicative: the machine is "
        f"shared)\n\nSeeds {seeds}: mean ± standard deviation over the seeds (in points) where there are several.\n\n{tables}\n\n"
        f"- Stand-ins: per seed, the toy LM pre-trained {budget.language_pretraining_steps} steps on caption text and "
        f"the toy encoder {budget.vision_pretraining_steps} steps with SigLIP's image-text loss, then hive-train's three "
        f"stages (Table 3) on {budget.train_size} synthetic pairs for every connector from that same start.\n"
        f"- Content / structural: teacher-forced top-1 accuracy on {budget.held_out_size} held-out captions' colour, "
        "texture, shape and position tokens / on a, in, the and the end of text; own image: each sample's, swapped: "
        "the next sample's (what a model earns from the picture is the difference).\n"
        f"- Probes: a linear classifier on the frozen encoder, {budget.probe_epochs} epochs, batch 64, Table 4's "
        "optimiser, no augmentation; shapes: 4 classes, digits: 10.\n"
        "- Gradients: at the stage-2 checkpoints (what stage 3 trains the encoder with), L2 norm at the output of "
        "encoder layers 1 and 8 over the L2 norm at the LM's text input embeddings (the same loss; comparable "
        f"across connectors), mean over {budget.gradient_samples} held-out pairs; the plots also give the share on the "
        f"captioned shape (which covers {area:.1%} of an image).\n"
        "- Attention entropy: per cross-attention block at stage 3, per head over the 16 keys of the block's level, "
        "mean over the queries that predict a caption token.\n"
        "- FLOPs (torch.utils.flop_counter) and ms: one forward+backward, batch 32, every parameter training.\n\n"
        + "".join(f"![{name}]({name})\n" for name in figures)
    )


def write_figures(
    out: Path, results: dict, profiles: dict[str, dict], held_out: SyntheticShapes, runs: dict[str, Path]
) -> list[str]:
    written = [
        plot_image_reading(
            {c: row["image_reading"] for c, row in results.items()}, out / "image_reading.png",
            title="Held-out content tokens: own image vs another sample's (dots: seeds)",
        ),
        plot_layer_curves(
            {c: row["gradients"]["relative_grad_norm"] for c, row in results.items()}, out / "gradient_norms.png",
            log=True, ylabel="|dLoss/d hidden| / |dLoss/d text input|",
            title="Caption-loss gradient per vision layer over its gradient at the LM input (stage 2)",
        ),
        plot_layer_curves(
            {c: row["gradients"]["object_share"] for c, row in results.items()}, out / "gradient_object_share.png",
            ylabel="share of squared gradient on the object", title="How much of each layer's gradient falls on the captioned shape",
        ),
        plot_gradient_maps(
            held_out.image(0), {c: (p["sample_maps"], p["sample_norms"]) for c, p in profiles.items()},
            out / "gradient_maps.png", caption=held_out.caption(0),
        ),
    ]  # fmt: skip
    entropies = {
        c: row["cross_attention"]["attention_entropy"] for c, row in results.items() if "cross_attention" in row
    }
    if entropies:
        uniform = next(
            row["cross_attention"]["uniform_entropy"] for row in results.values() if "cross_attention" in row
        )
        written.append(
            plot_layer_curves(
                entropies | {"uniform (reads nothing in particular)": [uniform] * len(next(iter(entropies.values())))},
                out / "attention_entropy.png", ylabel="entropy (nats)", xlabel="cross-attention block (LLM layer order)",
                title="Cross-attention entropy over the image's keys, stage 3",
            )
        )  # fmt: skip
    if "hive" in runs:
        loaded = load_hive(runs["hive"] / "stage3")
        batch = caption_batch(loaded, [held_out.image(0)], [held_out.caption(0)], prompt=PROMPT)
        maps = cross_attention_maps(loaded.model, batch)
        positions = [i for i, label in enumerate(batch["labels"][0].tolist()) if label != -100 and i > 0]
        tokens = [loaded.tokenizer.convert_ids_to_tokens(batch["input_ids"][0, i].item()) for i in positions]
        written.append(
            plot_attention_maps(
                held_out.image(0), torch.stack([maps.predicting(i) for i in positions]),
                row_labels=[f"-> {t}" for t in tokens], llm_layers=maps.llm_layers, path=out / "attention_maps.png",
            )
        )  # fmt: skip
    return [path.name for path in written]


def render_markdown(report: dict) -> str:
    """reproduce.md from what reproduce.json holds (`--report_only` re-renders a finished run this way)."""
    budget = Budget(**{key: tuple(v) if isinstance(v, list) else v for key, v in report["budget"].items()})
    tables = markdown_tables(report["results"], report["start_probe"])
    markdown = report_markdown(
        report["command"], report["environment"], report["seconds"], report["timings"], budget, tables,
        report["results"], report["figures"],
    )  # fmt: skip
    return (
        markdown
        + encoder_section(report["encoder_quality"], budget)
        + curves_section(report["learning_curves"], budget)
    )


def moving_label(budget: Budget) -> str:
    return f"encoder lr {budget.moving_vision_learning_rate:g}, {budget.moving_stage3_epochs:g} epochs"


def encoder_section(study: dict, budget: Budget) -> str:
    return (
        "\n## The encoder: starting vs exported, per layer\n\n"
        f"Linear probes ({budget.probe_epochs} epochs, batch 64, Table 4's optimiser, no augmentation) of the frozen "
        "encoder at the output of every layer and at its final output; `shades`: 18 classes (6 shades of teal 14 RGB "
        "units apart x 3 fill textures) that no connector trains on. Gains are paired per seed (exported minus the "
        "encoder that seed started from). Stage-3 budgets: Table 3 (2e-6 for everything, 1 epoch) and "
        f"{moving_label(budget)} from the same stage-2 checkpoint (the LM and HIVE's modules keep Table 3's rate).\n\n"
        + encoder_quality.markdown(study["start"], study["budgets"])
        + "\n\n"
        + "".join(f"- {line}\n" for line in encoder_quality.verdicts(study["budgets"], list(study["start"])))
        + "\n![encoder_probe_layers.png](encoder_probe_layers.png)\n"
    )


def curves_section(curves: dict | None, budget: Budget) -> str:
    if curves is None:
        return ""
    ratios = curves["ratio_to_concat_90"].get("default", {})
    lines = [
        f"{task}: " + ", ".join(f"{c} {r:.2g}x" if r is not None else f"{c} –" for c, r in row.items())
        for task, row in ratios.items()
    ]
    return (
        "\n## Sample efficiency: learning curves\n\n"
        f"Tiny models (SigLIP 4 x 64, Llama 2 x 64, the real HiveForConditionalGeneration) trained whole (AdamW 1e-3, "
        f"batch 32) for {budget.curve_steps} steps on image-only one-token tasks; held-out accuracy with the own "
        f"picture every 25 steps (`{CURVES_DIR}/curves.md` has every run).\n\n"
        + learning_curves.markdown({"default": curves["table"]["default"]}, budget.curve_steps)
        + "\nMedian steps to 90% over concat's: "
        + "; ".join(lines)
        + "\n\n![learning_curves.png](learning_curves/learning_curves.png)\n"
    )
