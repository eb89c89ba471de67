"""Is the exported encoder better than the one it started from? Per-layer probes and per-layer weight change.

The paper's title claim (HIVE pre-trains the *vision encoder*): a linear probe (Table 4's optimiser) of
the frozen encoder at every layer's output and at its final output, on held-out classification no
connector trains on, for the encoder a run started from and for each connector's exported encoder; and
how far stage 3 moved each encoder layer's weights. `hive-reproduce` runs it under two stage-3 budgets:
Table 3's (lr 2e-6 for everything) and one that moves the encoder (`--vision_learning_rate`, more epochs).
"""

from __future__ import annotations

import statistics
from pathlib import Path

from .probe import ProbeConfig, probe_layers
from .probe_data import LabelledImages
from .probe_features import encoder_depth, load_frozen_encoder
from .seed_statistics import SIGNIFICANCE, mean_and_spread, paired_greater

OUTPUT = "output"  # the encoder's own output (after its final norm), beside layers 1..L


def probe_encoder(path: Path, sets: dict[str, tuple[LabelledImages, LabelledImages]], config: ProbeConfig) -> dict:
    """{task: {"layers": [test accuracy at layer 1..L], "output": test accuracy}} of the encoder at `path`."""
    encoder, processor = load_frozen_encoder(path)
    layers = [*range(encoder_depth(encoder)), None]
    out = {}
    for task, (train, test) in sets.items():
        results = probe_layers(encoder, processor, train, test, layers, config, progress=False)
        out[task] = {"layers": [r.test_accuracy for r in results[:-1]], OUTPUT: results[-1].test_accuracy}
    return out


def layer_change(before: Path, after: Path) -> dict:
    """Relative L2 change of the encoder's weights between two checkpoints, per part: "embeddings", "layers"
    (one value per encoder layer, 1..L), "after the layers" (final norm, pooling head) and "total"."""
    first = load_frozen_encoder(before)[0].state_dict()
    second = load_frozen_encoder(after)[0].state_dict()
    depth = 1 + max(int(name.split("layers.")[1].split(".")[0]) for name in first if "layers." in name)

    def part(name: str) -> str:
        if "layers." in name:
            return f"layer{int(name.split('layers.')[1].split('.')[0]) + 1}"
        return "embeddings" if "embeddings" in name else "after the layers"

    moved: dict[str, float] = {}
    size: dict[str, float] = {}
    for name, tensor in first.items():
        key = part(name)
        moved[key] = moved.get(key, 0.0) + float((second[name].float() - tensor.float()).pow(2).sum())
        size[key] = size.get(key, 0.0) + float(tensor.float().pow(2).sum())
    relative = {key: (moved[key] / size[key]) ** 0.5 if size[key] else 0.0 for key in moved}
    return {
        "embeddings": relative.get("embeddings", 0.0),
        "layers": [relative[f"layer{k}"] for k in range(1, depth + 1)],
        "after the layers": relative.get("after the layers", 0.0),
        "total": (sum(moved.values()) / sum(size.values())) ** 0.5,
    }


# ---------------------------------------------------------------------- summaries over seeds
def summarise(start: list[dict], exported: list[dict], changes: list[dict]) -> dict:
    """Per task: the exported encoder's accuracy and its gain over the start (paired by seed), at the output and
    per layer; and the weight change per layer (mean over seeds). `start`, `exported`, `changes`: one per seed."""
    tasks = list(start[0])
    depth = len(start[0][tasks[0]]["layers"])
    out: dict = {"tasks": {}, "change": {}}
    for task in tasks:
        gains = [e[task][OUTPUT] - s[task][OUTPUT] for s, e in zip(start, exported, strict=True)]
        out["tasks"][task] = {
            OUTPUT: mean_and_spread([e[task][OUTPUT] for e in exported]),
            "gain": mean_and_spread(gains),
            "layers": [mean_and_spread([e[task]["layers"][k] for e in exported]) for k in range(depth)],
            "layer_gains": [
                mean_and_spread(
                    [e[task]["layers"][k] - s[task]["layers"][k] for s, e in zip(start, exported, strict=True)]
                )
                for k in range(depth)
            ],
        }
    out["change"] = {
        "total": mean_and_spread([c["total"] for c in changes]),
        "layers": [statistics.fmean(c["layers"][k] for c in changes) for k in range(depth)],
        "embeddings": statistics.fmean(c["embeddings"] for c in changes),
    }
    return out


def summarise_start(start: list[dict]) -> dict:
    tasks = list(start[0])
    depth = len(start[0][tasks[0]]["layers"])
    return {
        task: {
            OUTPUT: mean_and_spread([s[task][OUTPUT] for s in start]),
            "layers": [mean_and_spread([s[task]["layers"][k] for s in start]) for k in range(depth)],
        }
        for task in tasks
    }


def _pm(summary: dict, *, signed: bool = False) -> str:
    text = f"{100 * summary['mean']:+.1f}" if signed else f"{summary['mean']:.1%}"
    return text if len(summary["values"]) == 1 else f"{text} ± {100 * summary['sd']:.1f}"


def exceeds(mine: dict, other: dict) -> bool:
    """Whether `mine`'s gain beats `other`'s on the same seeds (a one-sided paired t-test at `SIGNIFICANCE`)."""
    return paired_greater(mine["values"], other["values"]).greater


def markdown(start: dict, budgets: dict[str, dict[str, dict]]) -> str:
    """Tables: output probes and gains per budget and connector; the per-layer gains; the per-layer weight change.
    `budgets`: {budget label: {connector: summarise(...)}}."""
    tasks = list(start)
    lines = [
        "| stage-3 budget | encoder | weight change (total) | "
        + " | ".join(f"{task}: accuracy (gain over start, points)" for task in tasks)
        + " |",
        "|" + " --- |" * (3 + len(tasks)),
        "| – | the encoder it started from | – | " + " | ".join(_pm(start[t][OUTPUT]) for t in tasks) + " |",
    ]
    for label, connectors in budgets.items():
        for connector, row in connectors.items():
            change = row["change"]["total"]
            lines.append(
                f"| {label} | {connector} | {100 * change['mean']:.3g}% | "
                + " | ".join(
                    f"{_pm(row['tasks'][t][OUTPUT])} ({_pm(row['tasks'][t]['gain'], signed=True)})" for t in tasks
                )
                + " |"
            )
    depth = len(start[tasks[0]]["layers"])
    for task in tasks:
        lines += [
            "",
            f"Per-layer probe, {task}: accuracy of the encoder it started from, then each exported encoder's gain over "
            "it (points, mean ± sd over seeds), at the output of encoder layer 1..L.",
            "",
            "| stage-3 budget | encoder | " + " | ".join(f"layer {k}" for k in range(1, depth + 1)) + " |",
            "|" + " --- |" * (2 + depth),
            "| – | started from | " + " | ".join(_pm(s) for s in start[task]["layers"]) + " |",
        ]
        for label, connectors in budgets.items():
            for connector, row in connectors.items():
                lines.append(
                    f"| {label} | {connector} | "
                    + " | ".join(_pm(g, signed=True) for g in row["tasks"][task]["layer_gains"])
                    + " |"
                )
    lines += [
        "",
        "Relative weight change of each encoder layer in stage 3 (mean over seeds, %).",
        "",
        "| stage-3 budget | encoder | embeddings | " + " | ".join(f"layer {k}" for k in range(1, depth + 1)) + " |",
        "|" + " --- |" * (3 + depth),
    ]
    for label, connectors in budgets.items():
        for connector, row in connectors.items():
            change = row["change"]
            lines.append(
                f"| {label} | {connector} | {100 * change['embeddings']:.3g} | "
                + " | ".join(f"{100 * value:.3g}" for value in change["layers"])
                + " |"
            )
    return "\n".join(lines)


def verdicts(budgets: dict[str, dict[str, dict]], tasks: list[str]) -> list[str]:
    """One sentence per budget and task: is HIVE's output-probe gain greater than concat's and cascaded's on the
    same seeds (one-sided paired t-test, p < SIGNIFICANCE), and is it above zero at all?"""
    out = []
    for label, connectors in budgets.items():
        if "hive" not in connectors:
            continue
        for task in tasks:
            hive = connectors["hive"]["tasks"][task]["gain"]
            beaten = [c for c in ("concat", "cascaded") if c in connectors]
            others = ", ".join(f"{c} {_pm(connectors[c]['tasks'][task]['gain'], signed=True)}" for c in beaten)
            if len(hive["values"]) < 2:
                out.append(f"{label}, {task}: hive's gain {_pm(hive, signed=True)} points vs {others} (one seed: no "
                           "test can judge a difference)")  # fmt: skip
                continue
            tests = {c: paired_greater(hive["values"], connectors[c]["tasks"][task]["gain"]["values"]) for c in beaten}
            wins = [c for c, test in tests.items() if test.greater]
            above_zero = paired_greater(hive["values"], [0.0] * len(hive["values"]))
            out.append(
                f"{label}, {task}: hive's gain {_pm(hive, signed=True)} points vs {others}: "
                + (f"greater than {' and '.join(wins)}" if wins else f"not shown greater than {' or '.join(beaten)}")
                + f" at p < {SIGNIFICANCE} ("
                + "; ".join(f"vs {c}: {test.describe()}" for c, test in tests.items())
                + ")"
                + (
                    ""
                    if above_zero.greater
                    else f"; hive's own gain is not shown above zero (p {above_zero.p_value:.2g})"
                )
            )
    return out


def plot_layer_gains(study: dict, path: Path) -> Path:
    """One panel per (stage-3 budget, task): each exported encoder's probe gain over its start at every layer
    (points, mean over seeds; bars: the seeds' sd)."""
    from .plots import _save, subplots

    budgets = study["budgets"]
    tasks = list(study["start"])
    figure, axes = subplots(
        len(budgets), len(tasks), figsize=(3.3 * len(tasks), 2.8 * len(budgets)), squeeze=False, sharex=True
    )
    for row, (label, connectors) in zip(axes, budgets.items(), strict=True):
        for ax, task in zip(row, tasks, strict=True):
            for index, (connector, summary) in enumerate(connectors.items()):
                gains = summary["tasks"][task]["layer_gains"]
                layers = range(1, len(gains) + 1)
                ax.errorbar(
                    [k + 0.06 * (index - 1.5) for k in layers], [100 * g["mean"] for g in gains],
                    yerr=[100 * g["sd"] for g in gains], marker="o", markersize=3, capsize=2, label=connector,
                    color=f"C{index}",
                )  # fmt: skip
            ax.axhline(0, color="grey", linewidth=0.8)
            ax.set_title(f"{task}, stage 3: {label}", fontsize=8)
            ax.set_xticks(list(layers))
            ax.grid(alpha=0.3)
        row[0].set_ylabel("probe gain over start (points)")
    for ax in axes[-1]:
        ax.set_xlabel("vision encoder layer")
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    return _save(figure, path)
