"""Scale-out beyond one process: FSDP2 through the Trainer, the same model from FSDP, DeepSpeed ZeRO-3 and one
process, resume from a sharded FSDP checkpoint, and a two-node launch simulated on one machine.

All on CPU ranks with gloo, 2 ranks (or 2 one-rank "nodes").
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel

import hive_adapter as hive  # noqa: F401  (AutoModel knows "hive")
from hive_adapter.data.synthetic import caption_vocabulary
from hive_adapter.tools.toy_models import ToySizes, write_toy_models

pytest.importorskip("deepspeed")
SMALL = ToySizes(image_size=32, patch_size=8, vision_width=32, vision_layers=4, text_width=64, text_layers=2)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
# Float32 on CPU; the ranks reduce gradients in another order than one process sums them.
TOLERANCE = dict(rtol=1e-4, atol=1e-6)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def common(stage0: Path, out: Path, *extra) -> list[str]:
    return [str(a) for a in [
        "--model_name_or_path", stage0, "--data_format", "synthetic", "--synthetic_size", 16, "--stage", "1,2",
        "--num_train_epochs", 1, "--global_batch_size", 8, "--output_dir", out, "--report_to", "none",
        "--seed", 0, "--disable_tqdm", "True", "--logging_steps", 1, *extra,
    ]]  # fmt: skip


def run(command: list[str], *, timeout: int = 900) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def torchrun(*args: str, nodes: str = "--nproc_per_node") -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", nodes, "2", "-m", "hive_adapter.training.train", *args]


@pytest.fixture(scope="module")
def stage0(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scale-out")
    vision, language = write_toy_models(root / "toy", caption_vocabulary(), sizes=SMALL)
    out = root / "composed"
    run([sys.executable, "-m", "hive_adapter.training.train",
         "--vision_model", str(vision), "--language_model", str(language), "--data_format", "synthetic", "--synthetic_size", "8", "--stage", "1", "--max_steps", "1",
         "--global_batch_size", "8", "--per_device_train_batch_size", "8", "--hive_tokens_per_level", "4",
         "--output_dir", str(out), "--report_to", "none", "--save_strategy", "no"])  # fmt: skip
    return out / "stage0"


@pytest.fixture(scope="module")
def trained(stage0, tmp_path_factory) -> dict[str, Path]:
    """Stages 1 and 2 (2 optimiser steps each) from the same stage 0, seed and data, three ways."""
    root = tmp_path_factory.mktemp("three-ways")
    runs = {
        "one process": [sys.executable, "-m", "hive_adapter.training.train",
                        *common(stage0, root / "single", "--per_device_train_batch_size", 8, "--save_strategy", "no")],
        "fsdp": torchrun(*common(stage0, root / "fsdp", "--per_device_train_batch_size", 4, "--fsdp", "full_shard",
                                 "--save_strategy", "no", "--verify_rank_consistency", "True")),
        "zero3": torchrun(*common(stage0, root / "zero3", "--per_device_train_batch_size", 4, "--deepspeed", "zero3",
                                  "--save_strategy", "no")),
    }  # fmt: skip
    outputs = {}
    for name, command in runs.items():
        run(command)
        outputs[name] = Path(command[command.index("--output_dir") + 1]) / "stage2"
    return outputs


def weights_of(directory: Path) -> dict[str, torch.Tensor]:
    """The weights as the model loads them (file key spellings differ between save paths, not the model)."""
    return AutoModel.from_pretrained(directory).state_dict()


def test_fsdp_deepspeed_and_one_process_train_the_same_weights(stage0, trained):
    reference = weights_of(trained["one process"])
    start = weights_of(stage0)
    moved = {key for key, tensor in reference.items() if not torch.equal(tensor, start[key])}
    assert any("hive_" in key for key in moved) and any(key.startswith("language_model.") for key in moved)
    for name in ("fsdp", "zero3"):
        weights = weights_of(trained[name])
        assert weights.keys() == reference.keys(), name
        for key, tensor in reference.items():
            torch.testing.assert_close(weights[key], tensor, **TOLERANCE, msg=f"{name}: {key}")
        assert json.loads((trained[name] / "hive_stage.json").read_text())["world_size"] == 2
        largest = max(float((weights[key] - tensor).abs().max()) for key, tensor in reference.items())
        print(f"{name} vs one process: largest difference {largest:.2e}")  # shown with pytest -s


def test_the_fsdp_model_loads_whole_and_computes_what_the_one_process_model_computes(trained):
    fsdp = AutoModel.from_pretrained(trained["fsdp"]).eval()
    single = AutoModel.from_pretrained(trained["one process"]).eval()
    assert isinstance(fsdp, hive.HiveForConditionalGeneration)
    config = json.loads((trained["fsdp"] / "config.json").read_text())
    assert config["architectures"] == ["HiveForConditionalGeneration"]  # not FSDP's swapped class name
    report = json.loads((trained["fsdp"] / "hive_stage.json").read_text())
    rank0, rank1 = report["rank_fingerprints"]
    assert rank0 == rank1
    ids = torch.randint(5, single.config.text_config.vocab_size, (2, 9))
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            fsdp(input_ids=ids, pixel_values=pixels).logits,
            single(input_ids=ids, pixel_values=pixels).logits,
            **TOLERANCE,
        )


KILL_AT_MARK = """
import os, sys
from hive_adapter.training import checkpoints, train
original = checkpoints.mark_complete
def mark_complete(folder, step):
    original(folder, step)
    if step == 2:
        os._exit(9)  # killed after the first sharded checkpoint is complete
checkpoints.mark_complete = mark_complete
train.main(sys.argv[1:])
"""


def test_fsdp_resumes_from_a_sharded_checkpoint(stage0, tmp_path):
    args = common(stage0, tmp_path / "straight", "--per_device_train_batch_size", 2, "--fsdp", "full_shard",
                  "--save_strategy", "steps", "--save_steps", 2, "--stage", "1")  # fmt: skip
    args[args.index("1,2")] = "1"
    run(torchrun(*args))
    straight = load_file(tmp_path / "straight" / "stage1" / "model.safetensors")

    killed = [a if a != str(tmp_path / "straight") else str(tmp_path / "killed") for a in args]
    driver = tmp_path / "driver.py"
    driver.write_text(KILL_AT_MARK)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(driver), *killed]
    crashed = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=900)
    assert crashed.returncode != 0
    checkpoint = tmp_path / "killed" / "stage1-checkpoints" / "checkpoint-2"
    assert (checkpoint / "pytorch_model_fsdp_0" / ".metadata").is_file()  # sharded: each rank wrote its part
    assert (checkpoint / "optimizer_0" / ".metadata").is_file() and not (tmp_path / "killed" / "stage1").exists()

    resumed = run(torchrun(*killed, "--resume_from_checkpoint", "auto"))
    assert "resuming from" in resumed.stdout and "checkpoint-2" in resumed.stdout
    again = load_file(tmp_path / "killed" / "stage1" / "model.safetensors")
    for key, tensor in straight.items():
        torch.testing.assert_close(again[key], tensor, **TOLERANCE, msg=key)


def test_two_nodes_form_one_job_through_the_rendezvous(stage0, tmp_path):
    """Two launchers, as on two machines (--nnodes 2, --node_rank 0/1, one rank each), meet at a local endpoint,
    train one stage together and save it once."""
    port = free_port()
    args = common(stage0, tmp_path / "run", "--per_device_train_batch_size", 4, "--save_strategy", "no",
                  "--verify_rank_consistency", "True")  # fmt: skip
    args[args.index("1,2")] = "1"
    launchers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--node_rank",
                str(rank),
                "--nproc_per_node",
                "1",
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                str(port),
                "-m",
                "hive_adapter.training.train",
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    outputs = [launcher.communicate(timeout=900) for launcher in launchers]
    for launcher, (stdout, stderr) in zip(launchers, outputs, strict=True):
        assert launcher.returncode == 0, stdout[-3000:] + stderr[-5000:]
    assert sum(stdout.count("[hive-train] done:") for stdout, _ in outputs) == 1  # rank 0 of node 0 reports
    report = json.loads((tmp_path / "run" / "stage1" / "hive_stage.json").read_text())
    assert report["world_size"] == 2
    rank0, rank1 = report["rank_fingerprints"]
    assert rank0 == rank1
    shutil.rmtree(tmp_path / "run" / "stage1-checkpoints", ignore_errors=True)
