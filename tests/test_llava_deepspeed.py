"""LLaVA's training with `--vision_connector hive` under DeepSpeed, as LLaVA users run it.

The three scripts of `examples/llava/` (LLaVA's v1_5 pretrain.sh / finetune.sh plus stage 3) run as
written with LLaVA's own zero2.json / zero3.json, on 2 CPU ranks (gloo), on transformers 5.x through
the integration's shims (LLaVA's pinned accelerate 0.21 cannot run DeepSpeed on CPU: its
AcceleratorState has no `use_ipex` there). Only paths, the launcher's rank count and CPU-sized flags
are passed from outside; the last flag wins.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("deepspeed")
pytest.importorskip("llava")

from llava_helpers import REPO, assert_trained_on_real_labels, rewrite_with_blocks_by_position

from benchmarks.serving import free_port
from hive_adapter.integrations.llava.toy import write_llava_toy

EXAMPLES = REPO / "examples" / "llava"
CPU_FLAGS = ["--use_cpu", "True", "--bf16", "False", "--tf32", "False", "--report_to", "none",
             "--per_device_train_batch_size", "8", "--dataloader_num_workers", "0", "--model_max_length", "128",
             "--save_strategy", "no", "--max_steps", "2"]  # fmt: skip


def run_example(script: str, toy: dict, **paths) -> str:
    extra = paths.pop("extra", [])
    # DeepSpeed's launcher rendezvous on a fixed 29500 unless told: a free port, so that two runs at once (pytest's
    # two xdist workers, a run beside another checkout's) do not fail with EADDRINUSE
    launcher = paths.pop("launcher", "deepspeed --num_nodes 1 --num_accelerators 2") + f" --master_port {free_port()}"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "LAUNCHER": launcher,
        "ENTRY": "hive_adapter.integrations.llava.train",  # train_mem needs flash-attn (GPU)
        "VISION_TOWER": str(toy["clip"]),
        "IMAGES": str(toy["data"]),
        **{key.upper(): str(value) for key, value in paths.items()},
    }
    result = subprocess.run(
        ["bash", str(EXAMPLES / script), *CPU_FLAGS, *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        cwd=REPO,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    return output


def vision_key(state: dict, suffix: str) -> str:
    (key,) = [key for key in state if key.endswith(suffix)]  # CLIP's key prefix differs between 4.x and 5.x
    return key


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava-ds")
    toy = write_llava_toy(root / "toy", samples=32)
    stage1 = run_example("pretrain.sh", toy, model=toy["vicuna"], data=toy["pretrain"], output=root / "llava-s1")
    stage2 = run_example(
        "finetune.sh",
        toy,
        model=toy["vicuna"],
        data=toy["finetune"],
        adapter=root / "llava-s1" / "mm_projector.bin",
        output=root / "llava-s2",
    )
    stage3 = run_example(
        "finetune_vision.sh",
        toy,
        model=root / "llava-s2",
        data=toy["finetune"],
        output=root / "llava-s3",
        extra=["--learning_rate", "1e-3"],
    )
    return root, toy, {1: stage1, 2: stage2, 3: stage3}


def test_zero2_stage1_saves_the_hive_adapter(runs):
    root, _, logs = runs
    assert_trained_on_real_labels(logs[1])
    assert logs[1].count("exits successfully") == 2  # both ranks
    weights = torch.load(root / "llava-s1" / "mm_projector.bin", map_location="cpu", weights_only=True)
    assert weights and all(key.startswith("model.mm_projector.hive_") for key in weights)
    assert json.loads((root / "llava-s1" / "config.json").read_text())["mm_projector_type"] == "hive"


def test_zero3_stage2_gathers_hive_for_saving_and_reloads(runs):
    root, toy, logs = runs
    assert_trained_on_real_labels(logs[2])
    saved = load_file(root / "llava-s2" / "model.safetensors")
    adapter = torch.load(root / "llava-s1" / "mm_projector.bin", map_location="cpu", weights_only=True)
    for key, value in adapter.items():  # full shapes: gathered from the ZeRO-3 partitions, not empty shards
        assert saved[key].shape == value.shape, key
    assert any((saved[key].float() - adapter[key].float()).abs().max() > 0 for key in adapter)
    answer = subprocess.run(
        [sys.executable, "-m", "hive_adapter.integrations.llava.ask", "--model-path", str(root / "llava-s2"),
         "--image-file", str(toy["data"] / "images" / "00000.png"), "--query", "What is in the image?",
         "--device", "cpu", "--max_new_tokens", "4"],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300,
    )  # fmt: skip
    assert answer.returncode == 0, answer.stderr[-3000:]


def test_zero3_stage3_trains_the_partitioned_vision_tower(runs):
    root, toy, logs = runs
    assert_trained_on_real_labels(logs[3])
    assert "vision tower 0," not in logs[3]
    saved = load_file(root / "llava-s3" / "model.safetensors")
    clip = load_file(toy["clip"] / "model.safetensors")
    suffix = "encoder.layers.0.self_attn.q_proj.weight"
    trained = saved[vision_key({k: v for k, v in saved.items() if "vision_tower" in k}, suffix)]
    assert trained.shape == clip[vision_key(clip, suffix)].shape
    assert (trained.float() - clip[vision_key(clip, suffix)].float()).abs().max() > 0
    assert json.loads((root / "llava-s3" / "config.json").read_text())["unfreeze_mm_vision_tower"] is True


def test_zero3_stage3_starts_from_a_stage2_checkpoint_with_blocks_saved_by_position(runs, tmp_path):
    """Stage 2 as hive-adapter saved it before it named a connector's blocks by decoder layer (`hive_blocks.<k>`;
    the toy's blocks sit in decoder layers 0 and 2). Under ZeRO-3 transformers loads partitioned parameters by
    name; stage 3 still starts from the same weights, so it ends where it ends from today's names."""
    root, toy, _ = runs
    old = tmp_path / "llava-s2-by-position"
    shutil.copytree(root / "llava-s2", old)
    rewrite_with_blocks_by_position(old)
    assert any(".hive_blocks.1." in key for key in load_file(old / "model.safetensors"))
    run_example(
        "finetune_vision.sh", toy, model=old, data=toy["finetune"], output=tmp_path / "s3",
        extra=["--learning_rate", "1e-3"],
    )  # fmt: skip
    reference = load_file(root / "llava-s3" / "model.safetensors")
    trained = load_file(tmp_path / "s3" / "model.safetensors")
    assert trained.keys() == reference.keys()
    for key, tensor in trained.items():
        torch.testing.assert_close(tensor.float(), reference[key].float(), rtol=1e-4, atol=1e-5, msg=key)


def test_llava_stage1_under_fsdp_saves_a_whole_adapter_that_the_next_stage_loads(runs, tmp_path):
    """LLaVA's own train() with --fsdp (FSDP2, 2 CPU ranks): the adapter is gathered from the shards, not one
    rank's half, and a single-process stage 2 starts from it."""
    root, toy, _ = runs
    flags = [
        "--vision_connector", "hive", "--model_name_or_path", str(toy["vicuna"]), "--version", "plain",
        "--vision_tower", str(toy["clip"]), "--data_path", str(toy["pretrain"]), "--image_folder", str(toy["data"]),
        "--tune_mm_mlp_adapter", "True", "--mm_vision_select_layer", "-2", "--mm_use_im_start_end", "False",
        "--mm_use_im_patch_token", "False", "--learning_rate", "1e-3", "--lazy_preprocess", "True", *CPU_FLAGS,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    fsdp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
         "hive_adapter.integrations.llava.train", *flags, "--output_dir", str(tmp_path / "fsdp"), "--fsdp", "full_shard"],
        capture_output=True, text=True, env=env, timeout=900, cwd=REPO,
    )  # fmt: skip
    assert fsdp.returncode == 0, (fsdp.stdout + fsdp.stderr)[-6000:]
    adapter = torch.load(tmp_path / "fsdp" / "mm_projector.bin", map_location="cpu", weights_only=True)
    reference = torch.load(root / "llava-s1" / "mm_projector.bin", map_location="cpu", weights_only=True)
    assert adapter.keys() == reference.keys()
    for key, value in adapter.items():
        assert type(value) is torch.Tensor and value.shape == reference[key].shape, key  # whole, not a shard
        assert torch.isfinite(value).all(), key
    stage2 = subprocess.run(
        [sys.executable, "-m", "hive_adapter.integrations.llava.train", "--vision_connector", "hive",
         "--model_name_or_path", str(toy["vicuna"]), "--version", "v1", "--vision_tower", str(toy["clip"]),
         "--data_path", str(toy["finetune"]), "--image_folder", str(toy["data"]), "--pretrain_mm_mlp_adapter",
         str(tmp_path / "fsdp" / "mm_projector.bin"), "--mm_vision_select_layer", "-2", "--mm_use_im_start_end",
         "False", "--mm_use_im_patch_token", "False", "--learning_rate", "2e-5", "--lazy_preprocess", "True",
         *CPU_FLAGS, "--max_steps", "1", "--logging_steps", "1", "--output_dir", str(tmp_path / "stage2")],
        capture_output=True, text=True, env=env, timeout=900, cwd=REPO,
    )  # fmt: skip
    assert stage2.returncode == 0, (stage2.stdout + stage2.stderr)[-6000:]
    assert_trained_on_real_labels(stage2.stdout + stage2.stderr)


def test_llava_finetune_with_a_text_only_rank_and_an_image_rank_trains_as_one_process(runs, tmp_path):
    """LLaVA's own train() (finetune.sh, ZeRO-3) on 2 ranks whose batches differ in modality: rank 0 only
    text-only conversations, rank 1 only conversations with an image (sequential sampling instead of LLaVA's
    modality grouping). No hang (bounded), and the weights of a one-rank run on the same batches: LLaVA's model
    averages its loss over each batch's own tokens, so the one-rank run sees the two ranks' batches as two
    accumulation steps (the mean of the two means, as the ranks' gradients are averaged)."""
    root, toy, _ = runs
    entries = json.loads(toy["finetune"].read_text())
    with_image = [entry for entry in entries if "image" in entry][:16]
    text_only = [{key: value for key, value in copy.deepcopy(entry).items() if key != "image"} for entry in with_image]
    for entry in text_only:
        for turn in entry["conversations"]:
            turn["value"] = turn["value"].replace("<image>", "").strip()
    assert all("<image>" in entry["conversations"][0]["value"] for entry in with_image)
    ordered = [*text_only[:8], *with_image[:8], *text_only[8:16], *with_image[8:16]]  # 8 per rank per step
    data = tmp_path / "mixed.json"
    data.write_text(json.dumps(ordered))
    common = dict(model=toy["vicuna"], data=data, adapter=root / "llava-s1" / "mm_projector.bin")
    sequential = ["--group_by_modality_length", "False", "--train_sampling_strategy", "sequential", "--seed", "0",
                  "--gradient_checkpointing", "False", "--learning_rate", "1e-3", "--lr_scheduler_type", "constant",
                  "--warmup_ratio", "0"]  # fmt: skip
    two = run_example("finetune.sh", toy, output=tmp_path / "two", extra=sequential, **common)
    assert two.count("exits successfully") == 2
    single = run_example(
        "finetune.sh", toy, output=tmp_path / "one", extra=[*sequential, "--gradient_accumulation_steps", "2"],
        launcher="deepspeed --num_nodes 1 --num_accelerators 1", **common,
    )  # fmt: skip
    assert_trained_on_real_labels(single)
    two_ranks, one_rank = (
        load_file(tmp_path / "two" / "model.safetensors"),
        load_file(tmp_path / "one" / "model.safetensors"),
    )
    start = torch.load(root / "llava-s1" / "mm_projector.bin", map_location="cpu", weights_only=True)
    assert any((one_rank[key].float() - value.float()).abs().max() > 0 for key, value in start.items())
    assert two_ranks.keys() == one_rank.keys()
    # float32, gradients reduced in another order; Adam (lr 1e-3) turns that noise, where a gradient is near 0, into
    # differences on a handful of weights (measured: with HIVE's width-scaled start 4.2e-5 at most, about a dozen of
    # ~400k weights beyond 1e-5; with the earlier N(0, 0.02) start 3e-6): every weight within 1e-4 (a tenth of one
    # step), and all but 1 in 10,000 within 1e-5
    beyond, total = 0, 0
    for key, tensor in one_rank.items():
        torch.testing.assert_close(two_ranks[key].float(), tensor.float(), rtol=1e-4, atol=1e-4, msg=key)
        difference = (two_ranks[key].float() - tensor.float()).abs()
        beyond += int((difference > 1e-5 + 1e-4 * tensor.float().abs()).sum())
        total += tensor.numel()
    assert beyond <= total // 10_000, f"{beyond} of {total} weights differ by more than 1e-5 between 2 ranks and 1"
