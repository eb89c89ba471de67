"""What the learning curves compare, and on what (`learning_curves`): the connectors and the variants of the
recipe, one run's settings, and the image-only tasks: one answer token that only the picture decides (a text
prior is at chance): a colour, a quadrant, a shape, a fill texture or a handwritten digit, drawn at a random spot
of a 32x32 picture, with a [BOS, question, answer] text whose loss is on the answer."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# What each compared model is: a connector, or a variant of one (hive_lean: HIVE with the lean projector).
CONNECTOR_SETTINGS = {
    "hive": {"connector": "hive"},
    "hive_lean": {"connector": "hive", "projector_type": "lean"},
    "cascaded": {"connector": "cascaded"},
    "concat": {"connector": "concat"},
    "deepstack": {"connector": "deepstack"},  # level 1 added after decoder layer 0, level 3 spliced
}
CONNECTORS = tuple(CONNECTOR_SETTINGS)


@dataclass(frozen=True)
class Variant:
    """One change against the default recipe: HiveConfig fields, and HIVE modules' learning-rate factor."""

    config: dict = field(default_factory=dict)
    hive_lr_factor: float = 1.0
    zero_output_projection: bool = False  # the cross-attention's output projection starts at 0 (LoRA's B)
    description: str = "the library's defaults"


VARIANTS = {
    "default": Variant(),
    "gate0.1": Variant(config={"gate_init": 0.1}, description="gates start at 0.1 instead of 0 (no identity at init)"),
    "init0.1": Variant(config={"initializer_range": 0.1}, description="HIVE's new weights N(0, 0.1)"),
    "init0.02": Variant(
        config={"initializer_range": 0.02}, description="HIVE's new weights N(0, 0.02) (the earlier default)"
    ),
    "fan_in": Variant(
        config={"initializer_range": None},
        description="HIVE's new weights N(0, 1/fan_in), scaled to each layer's input width (the default)",
    ),
    "zero_out": Variant(
        config={"initializer_range": None, "gate_init": 1.0},
        zero_output_projection=True,
        description="gates at 1 and the cross-attention's output projection at 0 (identity kept by the projection, "
        "as LoRA's B), the other new weights N(0, 1/fan_in)",
    ),
    "hive_lr3": Variant(hive_lr_factor=3.0, description="HIVE's modules at 3x the learning rate (3e-3)"),
    "ffn": Variant(config={"use_ffn": True}, description="a gated feed-forward after each cross-attention (Flamingo)"),
}


@dataclass(frozen=True)
class CurveRun:
    """What one curve is trained with."""

    task: str
    connector: str
    seed: int
    variant: str = "default"
    steps: int = 600
    eval_every: int = 25
    batch_size: int = 32
    learning_rate: float = 1e-3
    train_size: int = 2048
    held_out_size: int = 256

    @property
    def name(self) -> str:
        return f"{self.variant}-{self.task}-{self.connector}-seed{self.seed}"


TASKS = ("colour", "position", "shape", "texture", "digits")
THRESHOLDS = (0.9, 0.95)  # steps to 90% and to 95%
IMAGE, PATCH = 32, 8  # the tiny tower's input: 32x32 pictures, 8x8 patches
PAD, BOS = 0, 1
QUESTION = {task: 2 + index for index, task in enumerate(TASKS)}  # one question token per task
ANSWERS = {"colour": 8, "position": 4, "shape": 4, "texture": 4, "digits": 10}
FIRST_ANSWER = 2 + len(TASKS)
VOCAB = FIRST_ANSWER + max(ANSWERS.values())  # answers share token ids across tasks: one task per run
PALETTE = torch.tensor(
    [[1, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1], [1, -1, 1], [-1, 1, 1], [1, 1, 1], [-1, -1, -1]],
    dtype=torch.float32,
)  # 8 colours in the processor's [-1, 1] range; the background is 0 (grey)
OBJECT = 10  # side of the square box an object is drawn in (pixels)


def _shape_masks() -> torch.Tensor:
    """(4, OBJECT, OBJECT) masks of a square, circle, triangle and cross."""
    grid = torch.arange(OBJECT, dtype=torch.float32) + 0.5
    y, x = torch.meshgrid(grid, grid, indexing="ij")
    centre, radius = OBJECT / 2, OBJECT / 2
    square = torch.ones(OBJECT, OBJECT)
    circle = ((x - centre) ** 2 + (y - centre) ** 2 <= radius**2).float()
    triangle = ((x - centre).abs() <= y / 2).float()  # apex at the top, base at the bottom
    arm = OBJECT // 5
    cross = torch.zeros(OBJECT, OBJECT)
    cross[:, OBJECT // 2 - arm : OBJECT // 2 + arm] = 1
    cross[OBJECT // 2 - arm : OBJECT // 2 + arm, :] = 1
    return torch.stack([square, circle, triangle, cross])


def _texture_masks() -> torch.Tensor:
    """(4, OBJECT, OBJECT) fill patterns: solid, striped, dotted, checked (1: coloured, 0: background)."""
    index = torch.arange(OBJECT)
    solid = torch.ones(OBJECT, OBJECT)
    striped = ((index // 2) % 2 == 0).float()[None, :].expand(OBJECT, OBJECT).clone()
    dotted = torch.zeros(OBJECT, OBJECT)
    dotted[1::3, 1::3] = 1
    checked = (((index[:, None] // 2) + (index[None, :] // 2)) % 2 == 0).float()
    return torch.stack([solid, striped, dotted, checked])


def _digit_images(held_out: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scans, 16, 16) ink in [0, 1] and (scans,) labels: scikit-learn's digits, 4 of 5 scans for training, the
    fifth held out (so no held-out picture was seen in training)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16  # (1797, 8, 8)
    labels = torch.tensor(digits.target)
    keep = (torch.arange(len(labels)) % 5 == 4) if held_out else (torch.arange(len(labels)) % 5 != 4)
    images = images[keep].repeat_interleave(2, 1).repeat_interleave(2, 2)  # (scans, 16, 16)
    return images, labels[keep]


def image_task(task: str, count: int, *, seed: int, held_out: bool = False) -> dict[str, torch.Tensor]:
    """`count` pictures and [BOS, question, answer] texts whose loss is on the answer only."""
    if task not in TASKS:
        raise ValueError(f"task={task!r}: choose from {', '.join(TASKS)}")
    generator = torch.Generator().manual_seed(seed)
    colours = torch.randint(0, len(PALETTE), (count,), generator=generator)
    side = 16 if task == "digits" else OBJECT
    quadrants = torch.randint(0, 4, (count,), generator=generator)
    offsets = torch.randint(0, IMAGE // 2 - side + 1, (count, 2), generator=generator)  # inside one quadrant
    tops = (quadrants // 2) * (IMAGE // 2) + offsets[:, 0]
    lefts = (quadrants % 2) * (IMAGE // 2) + offsets[:, 1]
    if task == "digits":
        scans, scan_labels = _digit_images(held_out)
        pick = torch.randint(0, len(scan_labels), (count,), generator=generator)
        masks, answers = scans[pick], scan_labels[pick]
        colours = torch.full((count,), len(PALETTE) - 1)  # black ink
    elif task in ("shape", "texture"):
        kinds = torch.randint(0, 4, (count,), generator=generator)
        masks = (_shape_masks() if task == "shape" else _texture_masks())[kinds]
        answers = kinds
    else:
        masks = torch.ones(count, side, side)
        answers = colours if task == "colour" else quadrants
    pixels = torch.zeros(count, 3, IMAGE, IMAGE)
    for index in range(count):
        top, left = int(tops[index]), int(lefts[index])
        patch = pixels[index, :, top : top + side, left : left + side]  # (3, side, side), a view
        mask = masks[index]  # (side, side) in [0, 1]
        patch.copy_(mask * PALETTE[colours[index]][:, None, None] + (1 - mask) * patch)
    input_ids = torch.stack(
        [torch.full((count,), BOS), torch.full((count,), QUESTION[task]), FIRST_ANSWER + answers], 1
    )  # (count, 3)
    labels = input_ids.clone()
    labels[:, :2] = -100
    return {"input_ids": input_ids, "labels": labels, "pixel_values": pixels}
