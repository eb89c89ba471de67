"""Shared by the LLaVA integration tests (both transformers worlds): the toy bundle and LLaVA commands."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


ENTRY = [sys.executable, "-m", "hive_adapter.integrations.llava.train"]


def _shared_flags(toy: dict, output_dir: Path) -> list[str]:
    """The flags LLaVA's v1_5 pretrain.sh and finetune.sh share, CPU-sized."""
    return [
        "--vision_tower", str(toy["clip"]),
        "--image_folder", str(toy["data"]),
        "--mm_projector_type", "mlp2x_gelu",
        "--mm_vision_select_layer", "-2",
        "--mm_use_im_start_end", "False",
        "--mm_use_im_patch_token", "False",
        "--bf16", "False",
        "--output_dir", str(output_dir),
        "--num_train_epochs", "1",
        "--per_device_train_batch_size", "8",
        "--gradient_accumulation_steps", "1",
        "--save_strategy", "no",
        "--weight_decay", "0.",
        "--warmup_ratio", "0.03",
        "--lr_scheduler_type", "cosine",
        "--logging_steps", "1",
        "--model_max_length", "128",
        "--gradient_checkpointing", "True",
        "--dataloader_num_workers", "0",
        "--lazy_preprocess", "True",
        "--report_to", "none",
        "--use_cpu", "True",
        "--seed", "0",
    ]  # fmt: skip


def pretrain_command(toy: dict, output_dir: Path, *extra: str) -> list[str]:
    """LLaVA's scripts/v1_5/pretrain.sh (CPU-sized), through the HIVE entry point."""
    return [
        *ENTRY, *_shared_flags(toy, output_dir),
        "--model_name_or_path", str(toy["vicuna"]),
        "--version", "plain",
        "--data_path", str(toy["pretrain"]),
        "--tune_mm_mlp_adapter", "True",
        "--learning_rate", "1e-3",
        *extra,
    ]  # fmt: skip


def finetune_command(toy: dict, output_dir: Path, *extra: str) -> list[str]:
    """LLaVA's scripts/v1_5/finetune.sh (CPU-sized), through the HIVE entry point."""
    return [
        *ENTRY, *_shared_flags(toy, output_dir),
        "--model_name_or_path", str(toy["vicuna"]),
        "--version", "v1",
        "--data_path", str(toy["finetune"]),
        "--image_aspect_ratio", "pad",
        "--group_by_modality_length", "True",
        "--learning_rate", "2e-4",
        *extra,
    ]  # fmt: skip


def run_llava(command: list[str], *, env: dict | None = None, timeout: int = 600) -> str:
    """Run a LLaVA training command; fail with its output unless it exits 0. Returns stdout+stderr."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    result = subprocess.run(command, capture_output=True, text=True, env=full_env, timeout=timeout, cwd=REPO)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    return output


def logged_losses(output: str) -> list[float]:
    import re

    return [float(value) for value in re.findall(r"'loss': '?([0-9.]+)", output)]


def assert_trained_on_real_labels(output: str) -> None:
    """LLaVA masks a whole sample (loss 0.0) when its tokenizer disagrees with the conversation template."""
    assert "tokenization mismatch" not in output, (
        "LLaVA reported a tokenization mismatch: every label of those samples was masked"
    )
    losses = logged_losses(output)
    assert losses and all(loss > 0.5 for loss in losses), losses
