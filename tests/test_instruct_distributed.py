"""Mixed modality under distribution: instruction tuning on 2 CPU ranks where one rank's batches hold no image
and the other's hold images, under DeepSpeed ZeRO-3, FSDP2 and FSDP2 with gradient checkpointing.

The failure peers' trackers report most (LLaVA, Qwen-VL fine-tuning repos; Mllama refuses image-less samples):
a rank whose batch has no image skips the vision parameters, the other rank waits for them in a collective
forever. Here every run is bounded by a timeout, and must end with the weights a one-process run trains on the
same batches. The data is ordered so that, with the sequential sampler and 2 samples per rank, rank 0 always
gets the two text-only conversations of each group of four and rank 1 the two with images.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hive_checkpoints import SIZES, VISION_LAYERS
from transformers import AutoImageProcessor, AutoModel, AutoModelForCausalLM, AutoTokenizer

import hive_adapter as hive
from hive_adapter.data.conversations import instruction_vocabulary
from hive_adapter.data.synthetic import COLOURS, SyntheticShapes
from hive_adapter.model.loading import load_vision_encoder
from hive_adapter.tools.toy_models import write_toy_models

pytest.importorskip("deepspeed")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
TOLERANCE = dict(rtol=1e-4, atol=1e-6)  # float32; ranks reduce gradients in another order than one process
HANG_TIMEOUT = 600  # seconds: a hang in a collective ends the test instead of CI


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A captioning-mode HIVE model with its processor (as stage 3 leaves one), and LLaVA instruction data in
    groups of four: two text-only conversations, then two with a picture."""
    root = tmp_path_factory.mktemp("mixed")
    vision, language = write_toy_models(root / "toy", instruction_vocabulary(), sizes=SIZES)
    torch.manual_seed(0)
    model = hive.HiveForConditionalGeneration.from_vision_text(
        load_vision_encoder(vision),
        AutoModelForCausalLM.from_pretrained(language),
        hive.HiveConfig(vision_layers=VISION_LAYERS, llm_layers=[0, 1], tokens_per_level=4),
    )
    model.save_pretrained(root / "start")
    hive.HiveProcessor.for_model(
        model,
        tokenizer=AutoTokenizer.from_pretrained(language),
        image_processor=AutoImageProcessor.from_pretrained(vision),
    ).save_pretrained(root / "start")
    shapes = SyntheticShapes(8, seed=4, image_size=32)
    (root / "data").mkdir()
    entries, colours = [], list(COLOURS)
    for group in range(4):
        for k in range(2):
            word = colours[(2 * group + k) % len(colours)]
            entries.append({"id": f"text-{group}-{k}", "conversations": [
                {"from": "human", "value": f"repeat : {word}"}, {"from": "gpt", "value": word}]})  # fmt: skip
        for k in range(2):
            index = 2 * group + k
            shapes.image(index).save(root / "data" / f"{index}.png")
            entries.append({"id": f"image-{group}-{k}", "image": f"{index}.png", "conversations": [
                {"from": "human", "value": "<image>\nwhat colour is it ?"},
                {"from": "gpt", "value": shapes.sample(index).colour}]})  # fmt: skip
    (root / "data" / "instruct.json").write_text(json.dumps(entries))
    return root


def arguments(root: Path, out: Path, per_device: int, *extra) -> list[str]:
    return [str(a) for a in [
        "--stage", "sft", "--model_name_or_path", root / "start", "--data_path", root / "data" / "instruct.json",
        "--output_dir", out, "--global_batch_size", 4, "--per_device_train_batch_size", per_device,
        "--train_sampling_strategy", "sequential", "--max_steps", 3, "--learning_rate", 1e-3, "--seed", 0,
        "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "True", *extra,
    ]]  # fmt: skip


def run(command: list[str]) -> subprocess.CompletedProcess:
    try:
        result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=HANG_TIMEOUT)
    except subprocess.TimeoutExpired as hang:
        raise AssertionError(f"no end within {HANG_TIMEOUT} s (a hang in a collective?): {command}") from hang
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


# hive-train, saying which conversations each rank's collator batched and whether the batch held images.
BATCH_REPORTER = """
import os, sys
from hive_adapter.training import train
from hive_adapter.data import conversations
collate = conversations.HiveConversationCollator.__call__
def reporting(self, samples):
    batch = collate(self, samples)
    print(f"rank {os.environ['RANK']} images {'pixel_values' in batch}: {[s['source'] for s in samples]}", flush=True)
    return batch
conversations.HiveConversationCollator.__call__ = reporting
train.cli()  # as hive-train ends: a launched rank leaves through exit_rank (utils/distributed.py says why)
"""


def two_ranks(driver: Path, *args: str) -> list[str]:
    driver.write_text(BATCH_REPORTER)
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(driver), *args]


@pytest.fixture(scope="module")
def one_process(setup, tmp_path_factory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("single") / "run"
    run([sys.executable, "-m", "hive_adapter.training.train", *arguments(setup, out, 4)])
    return AutoModel.from_pretrained(out / "stage4").state_dict()


@pytest.mark.parametrize(
    "backend",
    [
        ("--deepspeed", "zero3"),
        ("--fsdp", "full_shard"),
        ("--fsdp", "full_shard", "--gradient_checkpointing", "True"),
    ],
    ids=["zero3", "fsdp2", "fsdp2+checkpointing"],
)
def test_a_text_only_rank_and_an_image_rank_train_together_to_the_one_process_weights(
    setup, one_process, backend, tmp_path
):
    out = tmp_path / "run"
    result = run(two_ranks(tmp_path / "driver.py", *arguments(setup, out, 2, *backend)))
    batches = [line for line in result.stdout.splitlines() if line.startswith("rank ")]
    assert {line.split(":")[0] for line in batches} == {"rank 0 images False", "rank 1 images True"}, batches
    assert result.stdout.count("[hive-train] done:") == 1
    report = json.loads((out / "stage4" / "hive_stage.json").read_text())
    assert report["world_size"] == 2 and report["global_steps"] == 3
    weights = AutoModel.from_pretrained(out / "stage4").state_dict()
    start = AutoModel.from_pretrained(setup / "start").state_dict()
    moved = [key for key, tensor in one_process.items() if not torch.equal(tensor, start[key])]
    assert any("hive_" in key for key in moved) and any(key.startswith("language_model.") for key in moved)
    assert weights.keys() == one_process.keys()
    for key, tensor in one_process.items():
        torch.testing.assert_close(weights[key], tensor, **TOLERANCE, msg=key)
