"""`hive-train --packing`: the same training as padded rows in one process and on 2 ranks (ZeRO-3, FSDP2), and a
killed packed run resumed to the same bytes as an uninterrupted one. Tiny models, a few steps each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from killed_runs import resumes_to_the_same_bytes
from transformers import AutoModel

import hive_adapter  # noqa: F401  (AutoModel knows "hive")
from hive_adapter.data.synthetic import caption_vocabulary
from hive_adapter.tools.toy_models import ToySizes, write_toy_models

pytest.importorskip("deepspeed")
SMALL = ToySizes(image_size=32, patch_size=8, vision_width=32, vision_layers=4, text_width=64, text_layers=2)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
# Float32 on CPU: packed rows and padded rows sum the same terms in another order; so do 2 ranks.
TOLERANCE = dict(rtol=1e-4, atol=1e-6)
# Rows of 24 tokens hold two synthetic captions (~11 tokens each): 8 samples become 4 rows.
PACKED = ["--packing", "--max_text_length", "24"]


def run(command: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def train(*args) -> list[str]:
    return [sys.executable, "-m", "hive_adapter.training.train", *map(str, args)]


def torchrun(*args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "hive_adapter.training.train",
            *map(str, args)]  # fmt: skip


def common(stage0: Path, out: Path, *extra, stages: str = "1,2", save: tuple = ("--save_strategy", "no")) -> list[str]:
    return [str(a) for a in [
        "--model_name_or_path", stage0, "--data_format", "synthetic", "--synthetic_size", 16, "--stage", stages,
        "--num_train_epochs", 1, "--global_batch_size", 8, "--output_dir", out, "--report_to", "none",
        "--seed", 0, "--disable_tqdm", "True", "--logging_steps", 1, *save, *extra,
    ]]  # fmt: skip


@pytest.fixture(scope="module")
def stage0(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("packing")
    vision, language = write_toy_models(root / "toy", caption_vocabulary(), sizes=SMALL)
    out = root / "composed"
    run(train("--vision_model", vision, "--language_model", language, "--data_format", "synthetic",
              "--synthetic_size", 8, "--stage", "1", "--max_steps", 1, "--global_batch_size", 8,
              "--per_device_train_batch_size", 8, "--hive_tokens_per_level", 4, "--output_dir", out,
              "--report_to", "none", "--save_strategy", "no"))  # fmt: skip
    return out / "stage0"


def losses(out: Path, stage: int) -> list[float]:
    return json.loads((out / f"stage{stage}" / "hive_stage.json").read_text())["losses"]


def weights(out: Path, stage: int) -> dict[str, torch.Tensor]:
    """The weights as the model loads them (file key spellings differ between save paths, not the model)."""
    return AutoModel.from_pretrained(out / f"stage{stage}").state_dict()


@pytest.fixture(scope="module")
def padded_run(stage0, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("padded") / "run"
    run(train(*common(stage0, out, "--per_device_train_batch_size", 8, "--max_text_length", 24)))
    return out


def assert_same_training(out: Path, reference: Path) -> None:
    for stage in (1, 2):
        assert losses(out, stage) == pytest.approx(losses(reference, stage), rel=1e-5, abs=1e-6), stage
        want = weights(reference, stage)
        got = weights(out, stage)
        assert got.keys() == want.keys()
        for key, tensor in want.items():
            torch.testing.assert_close(got[key], tensor, **TOLERANCE, msg=f"stage {stage}: {key}")


def test_packed_training_with_checkpointing_equals_padded_training(stage0, padded_run, tmp_path):
    """Stages 1 and 2 (HIVE, then HIVE + LLM), packed rows and gradient checkpointing: the padded run's losses and
    weights."""
    out = tmp_path / "packed"
    result = run(
        train(*common(stage0, out, "--per_device_train_batch_size", 8, *PACKED, "--gradient_checkpointing", "True"))
    )
    assert "packed rows of 24 tokens" in result.stdout  # really packed (the padded run says nothing of the kind)
    assert json.loads((out / "stage2" / "hive_stage.json").read_text())["packing_length"] == 24
    assert_same_training(out, padded_run)


@pytest.mark.parametrize("sharding", [["--deepspeed", "zero3"], ["--fsdp", "full_shard"]], ids=["zero3", "fsdp2"])
def test_packed_training_on_two_ranks_equals_one_padded_process(stage0, padded_run, tmp_path, sharding):
    out = tmp_path / "ranks"
    result = run(torchrun(*common(stage0, out, "--per_device_train_batch_size", 4, *PACKED, *sharding)))
    assert result.stdout.count("[hive-train] done:") == 1
    report = json.loads((out / "stage2" / "hive_stage.json").read_text())
    assert report["world_size"] == 2 and report["packing_length"] == 24
    assert_same_training(out, padded_run)


def test_a_killed_packed_run_resumes_to_the_same_bytes(stage0, tmp_path):
    def arguments(out: Path) -> list[str]:
        return common(stage0, out, "--per_device_train_batch_size", 4, *PACKED, stages="1",
                      save=("--save_strategy", "steps", "--save_steps", 2))  # fmt: skip

    resumed = resumes_to_the_same_bytes(arguments, tmp_path, stage=1, kill_at=2, env=ENV)
    assert "packed rows of 24 tokens" in resumed.stdout
