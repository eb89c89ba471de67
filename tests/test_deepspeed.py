"""Real 2-rank DeepSpeed training on CPU (gloo): ZeRO-2 and ZeRO-3, stage chaining, consolidated saves."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModel

import hive_adapter as hive  # noqa: F401  (AutoModel knows "hive")
from hive_adapter.data.synthetic import caption_vocabulary
from hive_adapter.tools.toy_models import ToySizes, write_toy_models

pytest.importorskip("deepspeed")
SMALL = ToySizes(image_size=32, patch_size=8, vision_width=32, vision_layers=4, text_width=64, text_layers=2)


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory):
    """The same stage-0 model, trained without DeepSpeed: the reference for parameter counts."""
    root = tmp_path_factory.mktemp("ds")
    vision, language = write_toy_models(root / "toy", caption_vocabulary(), sizes=SMALL)
    return root, vision, language


def torchrun(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "-m", "hive_adapter.training.train", *map(str, args)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


@pytest.mark.parametrize("zero, stages", [("zero2", "1"), ("zero3", "1,2")])
def test_two_rank_training_saves_one_consolidated_model(single_process_run, zero, stages):
    root, vision, language = single_process_run
    out = root / zero
    shutil.rmtree(out, ignore_errors=True)
    result = torchrun(
        "--vision_model", vision, "--language_model", language, "--data_format", "synthetic",
        "--synthetic_size", 32, "--stage", stages, "--output_dir", out, "--global_batch_size", 8,
        "--per_device_train_batch_size", 2, "--hive_tokens_per_level", 4, "--report_to", "none",
        "--save_strategy", "no", "--deepspeed", zero, "--verify_rank_consistency", "--seed", 0,
    )  # fmt: skip
    assert result.stdout.count("[hive-train] done:") == 1  # the CLI prints from rank 0 only
    last = out / f"stage{stages[-1]}"
    report = json.loads((last / "hive_stage.json").read_text())
    assert report["world_size"] == 2 and report["deepspeed"].endswith(f"{zero}.json")
    rank0, rank1 = report["rank_fingerprints"]
    assert rank0 == rank1  # both ranks hold the same full weights after training

    model = AutoModel.from_pretrained(last)  # one consolidated safetensors file, no ZeRO shards needed
    assert isinstance(model, hive.HiveForConditionalGeneration)
    assert not list(last.glob("*.pt")) and (last / "model.safetensors").is_file()
    for name, param in model.named_parameters():
        total, absolute = rank0[name]
        assert param.numel() > 0, name  # never the empty tensors of a partitioned save
        assert float(param.float().abs().sum()) == pytest.approx(absolute, rel=1e-4, abs=1e-4), name
        assert float(param.float().sum()) == pytest.approx(total, rel=1e-3, abs=1e-3), name

    stage0 = AutoModel.from_pretrained(out / "stage0")
    expected = {"hive": 0, "llm": 0, "vision": 0}
    for name, param in stage0.named_parameters():
        part = "hive" if "hive_" in name else "vision" if name.startswith("vision_model.") else "llm"
        expected[part] += param.numel()
    counts = report["trainable_parameters"]
    assert {part: c["total"] for part, c in counts.items()} == expected  # ZeRO-3 counts use ds_numel
    trained = {part for part, c in counts.items() if c["trainable"]}
    assert trained == ({"hive"} if stages[-1] == "1" else {"hive", "llm"})
    stage1 = AutoModel.from_pretrained(out / "stage1")
    moved = {
        name
        for (name, a), (_, b) in zip(stage1.named_parameters(), stage0.named_parameters(), strict=True)
        if not torch.equal(a, b)
    }
    assert moved and all("hive_" in name for name in moved)
