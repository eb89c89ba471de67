"""`hive-probe`: linear probe on a frozen vision encoder (supplementary Table 4).

    hive-probe vision_encoder/ --train data/train --test data/test     # DIR/<class>/<image>
    hive-probe vision_encoder/ --dataset digits                        # built-in, offline

ENCODER is any HF vision model directory: an encoder exported by `hive-export-vision`, a stock one
(SigLIP, CLIP, DINOv2, ...; a full CLIP/SigLIP model uses its vision tower), or a HIVE checkpoint
(its encoder is used). The encoder stays frozen; a linear classifier learns on its features with
Table 4's recipe: AdamW (betas 0.9, 0.999), peak LR 2e-4 with 1.5 warmup epochs and cosine decay to
0, weight decay 0.01, batch 512, gradient clipping 3.0, and Table 4's augmentations (re-encoded every
epoch). Features are the mean of the last layer's tokens by default (HIVE trains the encoder's
layers, not its pooling head), standardised by a non-affine BatchNorm in front of the linear layer
(MAE's linear-probe practice). `--layer K` probes the output of encoder layer K instead (0-based, before
the encoder's final norm): HIVE's mechanism predicts its largest gains in the early layers it reads.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..utils.console import on_a_terminal, quiet_progress_bars
from ..utils.flags import FullFlagParser
from ..utils.outputs import OutputRefused, output_file, write_file
from .augment import Table4Augment
from .probe_data import BUILT_IN, LabelledImages, built_in, image_folder
from .probe_features import encode_layers, encoder_depth, load_frozen_encoder

logger = logging.getLogger(__name__)

FEATURES = ("mean", "cls", "pooler")
FEW_STEPS = 200  # below this a linear probe from scratch is usually still under-fitted


@dataclass
class ProbeConfig:
    """Supplementary Table 4, plus what the table leaves open (epochs, features, seed)."""

    epochs: int = 30
    learning_rate: float = 2e-4
    min_learning_rate: float = 0.0
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    batch_size: int = 512
    grad_clip: float = 3.0
    warmup_epochs: float = 1.5
    augment: bool = True
    features: str = "mean"
    seed: int = 0
    layer: int | None = None  # None: the encoder's output; k: the output of encoder layer k (0-based, pre-norm)

    def __post_init__(self) -> None:
        if self.features not in FEATURES:
            raise ValueError(f"features={self.features!r}: expected one of {FEATURES}")
        if self.layer is not None and self.layer < 0:
            raise ValueError(f"layer={self.layer}: must be 0 or more (the first encoder layer is 0)")
        if self.layer is not None and self.features == "pooler":
            raise ValueError(
                f"features='pooler' reads the encoder's output, not layer {self.layer}: use features='mean' or 'cls'"
            )
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be at least 1")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate={self.learning_rate}: must be positive")


@dataclass
class ProbeResult:
    test_accuracy: float
    train_accuracy: float
    classes: list[str]
    train_images: int
    test_images: int
    steps: int = 0  # optimiser steps taken
    losses: list[float] = field(default_factory=list)  # mean training loss per epoch
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _image_size(processor) -> tuple[int, int]:
    size = getattr(processor, "crop_size", None) or getattr(processor, "size", None) or {}
    if "height" in size and "width" in size:
        return size["width"], size["height"]
    side = size.get("shortest_edge") or size.get("longest_edge") or 224
    return side, side


def _cosine_with_warmup(step: int, *, warmup: int, total: int, peak: float, floor: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


def linear_probe(
    encoder,
    processor,
    train: LabelledImages,
    test: LabelledImages,
    config: ProbeConfig | None = None,
    *,
    progress: bool = True,
) -> ProbeResult:
    """Train a linear classifier on the frozen encoder's features of `train`; report accuracy on `test`
    (`config`: Table 4's recipe when None)."""
    config = config if config is not None else ProbeConfig()
    return probe_layers(encoder, processor, train, test, [config.layer], config, progress=progress)[0]


def probe_layers(
    encoder,
    processor,
    train: LabelledImages,
    test: LabelledImages,
    layers: list[int | None],
    config: ProbeConfig | None = None,
    *,
    progress: bool = True,
) -> list[ProbeResult]:
    """One linear probe per entry of `layers` (None: the encoder's output; k: encoder layer k's output), each
    exactly as `linear_probe` trains it alone (own head, own BatchNorm statistics, own gradient clipping), but
    from one encoder pass per epoch (`config.layer` is not used: `layers` says which)."""
    config = config if config is not None else ProbeConfig()
    if train.classes != test.classes:
        raise ValueError(f"train classes {train.classes} and test classes {test.classes} differ")
    if len(train) == 0 or len(test) == 0:
        raise ValueError(f"empty split: {len(train)} training and {len(test)} test images")
    if not layers:
        raise ValueError("layers=[]: name at least one layer to probe (None for the encoder's output)")
    started = time.time()
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    train_images = [train.load(i) for i in range(len(train))]
    test_images = [test.load(i) for i in range(len(test))]
    train_labels, test_labels = torch.tensor(train.labels), torch.tensor(test.labels)
    augment = Table4Augment(size=_image_size(processor)) if config.augment else None
    read = {"features": config.features, "layers": list(layers)}
    clean_train = encode_layers(encoder, processor, train_images, **read)  # (train, layers, width)
    test_features = encode_layers(encoder, processor, test_images, **read)  # (test, layers, width)

    count, width, classes = len(layers), clean_train.shape[-1], len(train.classes)
    heads = StackedLinearProbes(count, width, classes, seed=config.seed)
    optimizer = torch.optim.AdamW(
        [
            {"params": [heads.weight], "weight_decay": config.weight_decay},
            {"params": [heads.bias], "weight_decay": 0.0},
        ],
        lr=config.learning_rate,
        betas=config.betas,
    )
    batch = min(config.batch_size, len(train))
    steps_per_epoch = math.ceil(len(train) / batch)
    total = config.epochs * steps_per_epoch
    warmup = max(1, round(config.warmup_epochs * steps_per_epoch))
    if total < FEW_STEPS:
        logger.warning(
            "the probe gets only %d optimiser steps (%d epochs x %d batches of %d): Table 4's batch of 512 is sized "
            "for ImageNet; on a small set raise epochs or lower batch_size",
            total,
            config.epochs,
            steps_per_epoch,
            batch,
        )
    losses, step = [], 0
    for _ in tqdm(range(config.epochs), desc="linear probe", disable=not (progress and on_a_terminal()), leave=False):
        if augment is not None:
            features = encode_layers(encoder, processor, [augment(image, rng) for image in train_images], **read)
        else:
            features = clean_train
        order = torch.randperm(len(train))
        heads.train()
        epoch_loss = torch.zeros(count)
        for start in range(0, len(train), batch):
            index = order[start : start + batch]
            if len(index) < 2:  # BatchNorm needs two samples; a lone remainder is skipped
                continue
            for group in optimizer.param_groups:
                group["lr"] = _cosine_with_warmup(
                    step, warmup=warmup, total=total, peak=config.learning_rate, floor=config.min_learning_rate
                )
            logits = heads(features[index])  # (batch, layers, classes)
            per_layer = nn.functional.cross_entropy(
                logits.transpose(1, 2), train_labels[index, None].expand(-1, count), reduction="none"
            ).mean(0)  # (layers,): each head's own mean loss
            optimizer.zero_grad()
            per_layer.sum().backward()  # heads share no parameter: each gets the gradient of its own loss
            heads.clip_each(config.grad_clip)
            optimizer.step()
            epoch_loss += per_layer.detach() * len(index)
            step += 1
        losses.append((epoch_loss / len(train)).tolist())
    heads.eval()
    with torch.no_grad():
        test_accuracy = (heads(test_features).argmax(-1) == test_labels[:, None]).float().mean(0)  # (layers,)
        train_accuracy = (heads(clean_train).argmax(-1) == train_labels[:, None]).float().mean(0)
    seconds = time.time() - started
    return [
        ProbeResult(
            test_accuracy=test_accuracy[k].item(),
            train_accuracy=train_accuracy[k].item(),
            classes=train.classes,
            train_images=len(train),
            test_images=len(test),
            steps=step,
            losses=[epoch[k] for epoch in losses],
            seconds=seconds,
        )
        for k in range(count)
    ]


class StackedLinearProbes(nn.Module):
    """`count` independent linear probes side by side: probe k is a non-affine BatchNorm (MAE's linear-probe
    practice) and a linear layer on features[:, k]. Stacked so one optimiser step trains them all; nothing is
    shared (BatchNorm statistics are per feature, AdamW is elementwise, `clip_each` clips per probe)."""

    def __init__(self, count: int, width: int, classes: int, *, seed: int = 0):
        super().__init__()
        self.count, self.width = count, width
        self.norm = nn.BatchNorm1d(count * width, affine=False)
        self.weight = nn.Parameter(torch.empty(count, width, classes))
        self.bias = nn.Parameter(torch.zeros(count, classes))
        for k in range(count):  # every probe starts as it would alone: from its own generator of `seed`
            nn.init.trunc_normal_(self.weight[k], std=0.01, generator=torch.Generator().manual_seed(seed))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(batch, count, width) -> (batch, count, classes)."""
        normed = self.norm(features.reshape(len(features), -1)).view(len(features), self.count, self.width)
        return torch.einsum("bkw,kwc->bkc", normed, self.weight) + self.bias

    @torch.no_grad()
    def clip_each(self, max_norm: float) -> None:
        """`clip_grad_norm_(probe k's parameters, max_norm)` for every k."""
        norms = (self.weight.grad.pow(2).sum((1, 2)) + self.bias.grad.pow(2).sum(1)).sqrt()  # (count,)
        scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        self.weight.grad.mul_(scale[:, None, None])
        self.bias.grad.mul_(scale[:, None])


def main(argv: list[str] | None = None) -> None:
    quiet_progress_bars(reloads_models=True)
    parser = FullFlagParser(
        prog="hive-probe", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )  # fmt: skip
    parser.add_argument(
        "encoder", help="vision model directory (exported HIVE encoder, stock encoder, HIVE checkpoint)"
    )
    data = parser.add_argument_group("data (an image folder pair, or a built-in set)")
    data.add_argument("--train", default=None, help="DIR/<class>/<image> to train the classifier on")
    data.add_argument("--test", default=None, help="DIR/<class>/<image> to evaluate on (same class names)")
    data.add_argument("--dataset", choices=BUILT_IN, default=None, help="a built-in offline set instead")
    data.add_argument("--dataset_size", type=int, default=2000, help="training images of the shapes set")
    recipe = parser.add_argument_group("recipe (Table 4 defaults)")
    defaults = ProbeConfig()
    recipe.add_argument("--epochs", type=int, default=defaults.epochs)
    recipe.add_argument("--learning_rate", type=float, default=defaults.learning_rate)
    recipe.add_argument("--weight_decay", type=float, default=defaults.weight_decay)
    recipe.add_argument("--batch_size", type=int, default=defaults.batch_size)
    recipe.add_argument("--grad_clip", type=float, default=defaults.grad_clip)
    recipe.add_argument("--warmup_epochs", type=float, default=defaults.warmup_epochs)
    recipe.add_argument("--no_augment", action="store_true", help="no augmentations (features are encoded once)")
    recipe.add_argument("--features", choices=FEATURES, default=defaults.features)
    recipe.add_argument(
        "--layer", type=int, default=None, help="probe encoder layer K's output (0-based) instead of the encoder's"
    )
    recipe.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    if args.output:
        try:
            output_file(args.output)  # a directory given for the JSON is refused before anything trains
        except OutputRefused as error:
            parser.error(str(error))
    if args.dataset and (args.train or args.test):
        parser.error("give either --dataset or --train/--test, not both")
    if args.dataset:
        train, test = built_in(args.dataset, seed=args.seed, size=args.dataset_size)
    elif args.train and args.test:
        train = image_folder(args.train)
        test = image_folder(args.test, classes=train.classes)
    else:
        parser.error("give --train DIR and --test DIR, or --dataset {digits,shapes}")
    try:
        config = ProbeConfig(
            epochs=args.epochs, learning_rate=args.learning_rate, weight_decay=args.weight_decay,
            batch_size=args.batch_size, grad_clip=args.grad_clip, warmup_epochs=args.warmup_epochs,
            augment=not args.no_augment, features=args.features, seed=args.seed, layer=args.layer,
        )  # fmt: skip
    except ValueError as error:
        parser.error(str(error).replace("layer=", "--layer ").replace("features=", "--features "))
    encoder, processor = load_frozen_encoder(args.encoder, device=args.device)
    if args.layer is not None and args.layer >= (depth := encoder_depth(encoder)):
        parser.error(f"--layer {args.layer}: {args.encoder} has {depth} layers (0 to {depth - 1})")
    print(
        f"[hive-probe] {type(encoder).__name__} from {args.encoder}; {len(train)} training / {len(test)} test images, "
        f"{len(train.classes)} classes ({train.source})"
    )
    result = linear_probe(encoder, processor, train, test, config)
    print(
        f"[hive-probe] top-1 accuracy: test {result.test_accuracy:.2%}, train {result.train_accuracy:.2%} "
        f"(chance {1 / len(train.classes):.2%}; {config.epochs} epochs, {result.steps} steps, {result.seconds:.0f} s)"
    )
    if result.steps < FEW_STEPS:
        print(
            f"[hive-probe] note: only {result.steps} optimiser steps; Table 4's batch of 512 is sized for ImageNet. "
            "On a small set raise --epochs or lower --batch_size (e.g. --batch_size 64 --epochs 200)."
        )
    if args.output:
        report = {"encoder": str(args.encoder), "data": {"train": train.source, "test": test.source},
                  "config": asdict(config), **result.to_dict()}  # fmt: skip
        write_file(args.output, lambda tmp: tmp.write_text(json.dumps(report, indent=2)))
        print(f"[hive-probe] written: {args.output}")


if __name__ == "__main__":
    main()
