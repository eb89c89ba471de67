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


def blocks_by_position(state: dict) -> dict:
    """`state` with its HIVE blocks named as hive-adapter named LLaVA's before it named them by decoder layer:
    `mm_projector.hive_blocks.<k>` for the k-th block (layers ascending)."""
    import re

    pattern = re.compile(r"mm_projector\.hive_blocks\.(\d+)\.")
    layers = sorted({int(match.group(1)) for key in state if (match := pattern.search(key))})
    return {
        pattern.sub(lambda m: f"mm_projector.hive_blocks.{layers.index(int(m.group(1)))}.", k): v
        for k, v in state.items()
    }


def rewrite_with_blocks_by_position(directory: Path) -> None:
    """A LLaVA checkpoint directory (one `model.safetensors`) rewritten with its blocks named by position."""
    from safetensors.torch import load_file, save_file

    weights = directory / "model.safetensors"
    save_file(blocks_by_position(load_file(weights)), weights, metadata={"format": "pt"})


def patched_llava_checkout(tree: Path) -> Path:
    """The installed llava-torch 1.2.2.post1 sources copied to `tree/llava` and `git apply`-ed with
    patches/llava/*.patch, as a user patches a LLaVA checkout; put `tree` on PYTHONPATH to run it."""
    import shutil

    import llava

    shutil.copytree(Path(llava.__file__).parent, tree / "llava", ignore=shutil.ignore_patterns("__pycache__"))
    patches = sorted((REPO / "patches" / "llava").glob("*.patch"))
    assert patches
    for patch in patches:
        subprocess.run(["git", "apply", "--check", str(patch)], cwd=tree, check=True)
        subprocess.run(["git", "apply", str(patch)], cwd=tree, check=True)
    return tree


def checkout_path(tree: Path) -> str:
    """PYTHONPATH that runs the checkout at `tree` (its `llava` first), keeping the caller's entries after it (the
    hive_adapter under test when it is not the installed one)."""
    return os.pathsep.join(entry for entry in (str(tree), os.environ.get("PYTHONPATH")) if entry)
