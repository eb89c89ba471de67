"""What hive-reproduce runs (`reproduce`): the connectors and variants it compares, HIVE's levels and depths on
the toy pair, the budgets (the full one and `--quick`), and the files one run owns in `--output_dir` and
`--work_dir`."""

from __future__ import annotations

from dataclasses import dataclass

from . import learning_curves

CONNECTORS = ("hive", "cascaded", "concat")  # the default comparison
# What --connectors may name: a connector, or a variant of one (the hive-train flags it adds).
VARIANTS = {
    "hive": ("hive", []), "cascaded": ("cascaded", []), "concat": ("concat", []),
    "deepstack": ("deepstack", []),  # Qwen3-VL's DeepStack: concat's splice + shallower levels added in layers 0-2
    "hive_lean": ("hive", ["--hive_projector_type", "lean"]),  # issue 19's leaner projector, same levels
}  # fmt: skip
CROSS_ATTENTION = ("hive", "cascaded", "hive_lean")
HIVE_FLAGS = ["--hive_vision_layers", "1,3,5,7", "--hive_llm_layers", "0,1,2,3", "--hive_tokens_per_level", "16"]
# Table 4's optimiser; on these small sets its batch 512 would give a handful of steps, so the probe
# uses batch 64 on features encoded once (no augmentation: re-encoding every epoch triples the time).
PROBE = dict(batch_size=64, augment=False)
HELD_OUT_SEED_OFFSET = 10_000  # held-out synthetic seeds: apart from hive-train's (the run's seed) and pre-training's


@dataclass(frozen=True)
class Budget:
    """How big a run is; `--quick` is the small one. Pre-training steps of 0 leave a stand-in random."""

    seeds: tuple[int, ...]
    train_size: int
    held_out_size: int
    gradient_samples: int
    probe_size: int
    probe_epochs: int
    language_pretraining_steps: int
    vision_pretraining_steps: int
    # the stage-3 budget that moves the encoder: stage 3 rerun from stage 2 with this encoder rate and epochs
    moving_vision_learning_rate: float
    moving_stage3_epochs: float
    curve_steps: int  # learning curves: steps of each run (0: no learning curves)
    curve_tasks: tuple[str, ...]


FULL = Budget(
    seeds=(0, 1, 2), train_size=4000, held_out_size=256, gradient_samples=32, probe_size=2000, probe_epochs=200,
    language_pretraining_steps=300, vision_pretraining_steps=600, moving_vision_learning_rate=2e-4,
    moving_stage3_epochs=2, curve_steps=1000, curve_tasks=learning_curves.TASKS,
)  # fmt: skip
QUICK = Budget(
    seeds=(0,), train_size=2000, held_out_size=128, gradient_samples=16, probe_size=500, probe_epochs=50,
    language_pretraining_steps=200, vision_pretraining_steps=300, moving_vision_learning_rate=2e-4,
    moving_stage3_epochs=1, curve_steps=100, curve_tasks=("colour",),
)  # fmt: skip
PROBE_TASKS = ("shapes", "digits", "shades")


COMMAND = "hive-reproduce"
# What one run writes into --output_dir: replaced only when an earlier hive-reproduce wrote them.
REPORT_FILES = ("reproduce.json", "reproduce.md")
FIGURE_FILES = ("image_reading.png", "gradient_norms.png", "gradient_object_share.png", "gradient_maps.png",
                "attention_entropy.png", "attention_maps.png", "encoder_probe_layers.png")  # fmt: skip
# Beside the checkpoints in --work_dir: the settings they were trained with, so a rerun never reuses models
# and stages of another budget under a report that claims this one.
WORK_RECORD = "hive-reproduce-work.json"
