"""What the learning curves write: the summary per (variant, task, connector) over seeds, its markdown table
(median steps to 90% / 95%), the ratio to concat, and the figure (`learning_curves`)."""

from __future__ import annotations

import statistics
from pathlib import Path

from .curve_runs import CONNECTORS, TASKS, VARIANTS


def summarise(results: list[dict]) -> dict:
    """{variant: {task: {connector: {steps_to_90/95 per seed, final own / swapped mean}}}}."""
    table: dict = {}
    for result in results:
        run = result["run"]
        row = (
            table.setdefault(run["variant"], {})
            .setdefault(run["task"], {})
            .setdefault(
                run["connector"],
                {"seeds": [], "steps_to": {key: [] for key in ("90%", "95%")}, "own": [], "swapped": []},
            )
        )
        row["seeds"].append(run["seed"])
        for key in ("90%", "95%"):
            row["steps_to"][key].append(result["steps_to"][key])
        row["own"].append(result["own"][-1][1])
        row["swapped"].append(result["swapped"][-1][1])
    return table


def _steps_text(values: list[int | None], limit: int) -> str:
    """`150 (125, 150, 175)`: the median over seeds (a seed that never got there counts as more than `limit`)."""
    reached = [value if value is not None else limit + 1 for value in values]
    median = statistics.median(reached)
    head = f">{limit}" if median > limit else f"{median:.0f}"
    return f"{head} ({', '.join('–' if v is None else str(v) for v in values)})"


def markdown(table: dict, limit: int) -> str:
    lines = []
    for variant, tasks in table.items():
        lines += [
            f"### {variant}: {VARIANTS[variant].description}" if variant in VARIANTS else f"### {variant}",
            "",
            "Steps to 90% / 95% held-out accuracy with the own picture: median over seeds (each seed's step; – never "
            f"within {limit} steps). Final accuracy own / swapped picture (mean over seeds).",
            "",
            "| task | connector | steps to 90% | steps to 95% | final own / swapped |",
            "| --- | --- | --- | --- | --- |",
        ]
        for task, connectors in tasks.items():
            for connector, row in connectors.items():
                lines.append(
                    f"| {task} | {connector} | {_steps_text(row['steps_to']['90%'], limit)} | "
                    f"{_steps_text(row['steps_to']['95%'], limit)} | {statistics.fmean(row['own']):.1%} / "
                    f"{statistics.fmean(row['swapped']):.1%} |"
                )
        lines.append("")
    return "\n".join(lines)


def _median_steps(row: dict, key: str) -> float | None:
    """Median over seeds of the steps to `key`, or None when a seed never got there."""
    values = row["steps_to"][key]
    return None if any(value is None for value in values) else statistics.median(values)


def ratio_to_concat(table: dict, limit: int, key: str = "90%") -> dict:
    """{variant: {task: {connector: median steps / concat's median steps}}} (None where either never got there)."""
    out: dict = {}
    for variant, tasks in table.items():
        for task, connectors in tasks.items():
            if "concat" not in connectors:
                continue

            base = _median_steps(connectors["concat"], key)
            for connector, row in connectors.items():
                mine = _median_steps(row, key)
                out.setdefault(variant, {}).setdefault(task, {})[connector] = (
                    mine / base if mine is not None and base else None
                )
    return out


def plot_curves(results: list[dict], path: Path) -> Path:
    """One panel per task: held-out accuracy (own picture solid, swapped dashed) vs step, one line per connector
    (mean over seeds) of the default variant; where no run is of the default variant (a study of starts), one
    line per variant and connector."""
    from .plots import _save, subplots

    chosen = [r for r in results if r["run"]["variant"] == "default"] or results
    series = sorted(
        {(r["run"]["variant"], r["run"]["connector"]) for r in chosen}, key=lambda s: (s[0], CONNECTORS.index(s[1]))
    )
    named = len({variant for variant, _ in series}) > 1
    tasks = [task for task in TASKS if any(r["run"]["task"] == task for r in chosen)]
    figure, axes = subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3.0), squeeze=False, sharey=True)
    for ax, task in zip(axes[0], tasks, strict=True):
        for index, (variant, connector) in enumerate(series):
            runs = [r for r in chosen if (r["run"]["task"], r["run"]["variant"], r["run"]["connector"]) ==
                    (task, variant, connector)]  # fmt: skip
            if not runs:
                continue
            steps = [step for step, _ in runs[0]["own"]]
            label = f"{connector} ({variant})" if named else connector
            for kind, style in (("own", "-"), ("swapped", "--")):
                mean = [statistics.fmean(r[kind][i][1] for r in runs) for i in range(len(steps))]
                ax.plot(steps, mean, style, color=f"C{index}", label=label if kind == "own" else None)
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out accuracy (own —, swapped --)")
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    return _save(figure, path)
