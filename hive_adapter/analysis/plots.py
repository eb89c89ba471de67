"""Figures in the style of the paper's §9: the image, then one heat-map panel per layer.

matplotlib is imported lazily (the `analysis` extra) and used through its object API (`subplots`): the user's
backend is never switched. Everything here writes a PNG and returns its path.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..utils.outputs import write_file


def subplots(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float], **options):
    """`(figure, axes)` like `pyplot.subplots`, through matplotlib's object API: the figure belongs to no
    backend and to no pyplot state, so plotting never switches the user's backend (a notebook's) nor leaves
    figures open in it."""
    try:
        from matplotlib.figure import Figure
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("plots need matplotlib: pip install 'hive-adapter[analysis]'") from error
    figure = Figure(figsize=figsize)
    return figure, figure.subplots(nrows, ncols, **options)


def _overlay(
    ax, image: Image.Image, heat: torch.Tensor, *, title: str, scale: tuple[float, float] | None = None
) -> None:
    """The image with `heat` (grid_h, grid_w) drawn over it: stretched to its own min..max (the structure
    within one panel) or, with `scale`, on a fixed range shared by the figure (values comparable)."""
    width, height = image.size
    heat = heat.float()
    low, high = scale if scale is not None else (float(heat.min()), float(heat.max()))
    normalised = ((heat - low) / (high - low)).clamp(0, 1) if high > low else torch.zeros_like(heat)
    ax.imshow(image)
    ax.imshow(
        normalised.numpy(),
        cmap="jet",
        alpha=0.5,
        extent=(0, width, height, 0),
        interpolation="bilinear",
        vmin=0.0,
        vmax=1.0,
    )
    ax.set_title(title, fontsize=7)
    ax.axis("off")


def _image_panel(ax, image: Image.Image, title: str) -> None:
    ax.imshow(image)
    ax.set_title(title, fontsize=7)
    ax.axis("off")


def plot_gradient_maps(
    image: Image.Image, rows: dict[str, tuple[torch.Tensor, Sequence[float]]], path: str | Path, *, caption: str = ""
) -> Path:
    """One row per model: the image, then per-layer gradient maps (first -> last) titled with their norms.
    Each panel is stretched to its own range (where the gradient falls); the norms give the magnitudes.

    rows: label -> (patch_maps (layers, grid_h, grid_w), layer_norms (layers,)).
    """
    layers = max(maps.shape[0] for maps, _ in rows.values())
    figure, axes = subplots(len(rows), layers + 1, figsize=(1.3 * (layers + 1), 1.45 * len(rows) + 0.4), squeeze=False)
    for row, (label, (maps, norms)) in enumerate(rows.items()):
        _image_panel(axes[row, 0], image, label)
        for layer in range(layers):
            ax = axes[row, layer + 1]
            if layer < maps.shape[0]:
                _overlay(ax, image, maps[layer], title=f"layer {layer + 1}\n|g| {norms[layer]:.2e}")
            else:
                ax.axis("off")
    figure.suptitle(
        f'gradient of the caption loss per vision layer: "{caption}"' if caption else "gradient maps", fontsize=8
    )
    figure.tight_layout()
    return _save(figure, path)


def plot_attention_maps(
    image: Image.Image, maps: torch.Tensor, *, row_labels: Sequence[str], llm_layers: Sequence[int], path: str | Path
) -> Path:
    """One row per text token: the image, then its head-averaged cross-attention in each HIVE layer.

    maps: (tokens, blocks, grid_h, grid_w). One colour scale for the whole figure (0 to the largest
    weight), so a block that spreads its attention evenly stays dark and a focused one lights up.
    """
    rows, blocks = maps.shape[:2]
    scale = (0.0, float(maps.max()))
    figure, axes = subplots(rows, blocks + 1, figsize=(1.3 * (blocks + 1), 1.35 * rows + 0.4), squeeze=False)
    for row in range(rows):
        _image_panel(axes[row, 0], image, row_labels[row])
        for block in range(blocks):
            _overlay(axes[row, block + 1], image, maps[row, block], title=f"LLM layer {llm_layers[block]}", scale=scale)
    figure.suptitle("HIVE cross-attention, head-averaged (per token: where the model looks to produce it)", fontsize=8)
    figure.tight_layout()
    return _save(figure, path)


def plot_layer_curves(
    curves: dict[str, Sequence[float]],
    path: str | Path,
    *,
    ylabel: str,
    title: str,
    log: bool = False,
    xlabel: str = "vision encoder layer",
) -> Path:
    """Lines over layers (1..L), one per model."""
    figure, ax = subplots(figsize=(5.2, 3.4))
    for label, values in curves.items():
        ax.plot(np.arange(1, len(values) + 1), values, marker="o", label=label)
    ax.set_xticks(np.arange(1, max(len(values) for values in curves.values()) + 1))
    if log:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    figure.tight_layout()
    return _save(figure, path)


def plot_image_reading(readings: dict[str, dict], path: str | Path, *, title: str) -> Path:
    """Bars of content-token accuracy with each sample's own image and with another sample's, per model, with
    one dot per seed. readings: label -> `{"real"|"swapped": {"content": {"mean", "values"}}}`."""
    figure, ax = subplots(figsize=(5.2, 3.4))
    width = 0.38
    for offset, (kind, label, colour) in enumerate(
        (("real", "own image", "tab:blue"), ("swapped", "swapped image (control)", "tab:gray"))
    ):
        for index, reading in enumerate(readings.values()):
            summary = reading[kind]["content"]
            x = index + (offset - 0.5) * width
            ax.bar(x, summary["mean"], width, color=colour, label=label if index == 0 else None)
            ax.scatter([x] * len(summary["values"]), summary["values"], color="black", s=8, zorder=3)
    ax.set_xticks(range(len(readings)), list(readings))
    ax.set_ylim(0, 1)
    ax.set_ylabel("content-token accuracy")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    figure.tight_layout()
    return _save(figure, path)


def _save(figure, path: str | Path) -> Path:
    return write_file(path, lambda tmp: figure.savefig(tmp, dpi=150))
