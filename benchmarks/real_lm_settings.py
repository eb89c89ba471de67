"""What the real-LM study compares (`benchmarks.real_lm`, `benchmarks.real_lm_timing`): where it writes, the
connectors and stages, HIVE's levels and depths over SmolLM2's 30 layers, the toy encoder's input size."""

from __future__ import annotations

from pathlib import Path

OUTPUT = Path(__file__).parent / "results" / "real_lm"
CONNECTORS = ("hive", "concat", "cascaded")  # the table's order; the study runs --connectors
STAGES = (1, 2)
STAGE_ONE_ONLY = "stage1-only"  # runs measured before stage 2 was (seeds 0 and 1, stage 1 only)
VISION_LAYERS, LLM_LAYERS, TOKENS_PER_LEVEL = "1,3,5,7", "0,7,15,22", 16
ENCODER_PRETRAINING_STEPS = 600  # hive-reproduce's default
IMAGE_SIZE = 64  # the toy SigLIP's
CAPTIONS_SHOWN, CAPTION_TOKENS = 4, 12


def say(message: str) -> None:
    print(f"[real_lm] {message}", flush=True)
