"""hive-train stage 1 over HIVE models whose encoders are VLM families' own (issue 37): Qwen2.5-VL's ViT with its
image processor (packed patches + image_grid_thw) and SmolVLM's encoder with Idefics3's image processor (crops +
pixel_attention_mask). The collator passes what the image processor says the model takes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from family_models import build_qwen2_5_vl, build_smolvlm
from hive_checkpoints import toy_models
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import hive_adapter as hive
from hive_adapter.data.collator import image_is_finite

ROOT = Path(__file__).resolve().parents[1]


def qwen_image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(patch_size=4, temporal_patch_size=2, merge_size=2, min_pixels=256, max_pixels=1024)


def smolvlm_image_processor():
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    return Idefics3ImageProcessorPil(size={"longest_edge": 32}, max_image_size={"longest_edge": 32})


FAMILY_ENCODERS = {
    "qwen2_5_vl": (build_qwen2_5_vl, qwen_image_processor),
    "smolvlm": (build_smolvlm, smolvlm_image_processor),
}


@pytest.fixture(scope="module")
def family_starts(tmp_path_factory):
    """family -> a saved HIVE model (its encoder the family's, a toy Llama) with tokenizer and the family's image
    processor: what `--model_name_or_path` starts from."""
    root = tmp_path_factory.mktemp("families")
    language_dir = toy_models(root / "toy")[1]
    starts = {}
    for family, (build, image_processor) in FAMILY_ENCODERS.items():
        torch.manual_seed(0)
        model = hive.HiveForConditionalGeneration.from_vision_text(
            build().get_encoder(modality="image"),
            AutoModelForCausalLM.from_pretrained(language_dir),
            hive.HiveConfig(vision_layers=[1, 3]),
        )
        starts[family] = root / family
        model.save_pretrained(starts[family])
        AutoTokenizer.from_pretrained(language_dir).save_pretrained(starts[family])
        image_processor().save_pretrained(starts[family])
    return starts


def hive_train(*args: str, ranks: int = 1) -> subprocess.CompletedProcess:
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks)] if ranks > 1 else []
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, *launcher, "-m", "hive_adapter.training.train", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=1200,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    return run


def moved_parameters(start: Path, trained: Path) -> set[str]:
    before, after = load_file(start / "model.safetensors"), load_file(trained / "model.safetensors")
    return {name for name in before if not torch.equal(before[name], after[name])}


COMMON = ["--stage", "1", "--data_format", "synthetic", "--synthetic_size", "8", "--global_batch_size", "4",
          "--report_to", "none", "--save_strategy", "no", "--seed", "0"]  # fmt: skip


@pytest.mark.parametrize("family", sorted(FAMILY_ENCODERS))
def test_hive_train_stage_1_runs_over_a_family_encoder(family, family_starts, tmp_path):
    start = family_starts[family]
    run = hive_train("--model_name_or_path", str(start), *COMMON, "--per_device_train_batch_size", "4",
                     "--output_dir", str(tmp_path))  # fmt: skip
    assert "stage 1 step 2/2" in run.stdout
    moved = moved_parameters(start, tmp_path / "stage1")
    assert moved and all(name.startswith("hive_") for name in moved), sorted(moved)[:5]


@pytest.mark.parametrize("family", sorted(FAMILY_ENCODERS))
def test_a_zero3_two_rank_step_over_a_family_encoder(family, family_starts, tmp_path):
    """Real DeepSpeed ZeRO-3 on 2 gloo ranks: each rank's packed patches / crops run the partitioned encoder and
    HIVE's modules; both ranks end with the same weights, and only HIVE's moved."""
    pytest.importorskip("deepspeed")
    start = family_starts[family]
    hive_train("--model_name_or_path", str(start), *COMMON, "--per_device_train_batch_size", "2",
               "--deepspeed", "zero3", "--verify_rank_consistency", "--output_dir", str(tmp_path), ranks=2)  # fmt: skip
    report = json.loads((tmp_path / "stage1" / "hive_stage.json").read_text())
    assert report["world_size"] == 2
    rank0, rank1 = report["rank_fingerprints"]
    assert rank0 == rank1
    moved = moved_parameters(start, tmp_path / "stage1")
    assert moved and all(name.startswith("hive_") for name in moved), sorted(moved)[:5]


def test_a_non_finite_packed_image_is_named_by_its_image_not_its_patch():
    grid = torch.tensor([[1, 2, 2], [1, 2, 4]])
    pixels = torch.zeros(12, 5)
    pixels[7, 0] = float("nan")  # a patch of the second image
    assert image_is_finite({"pixel_values": pixels, "image_grid_thw": grid}, 2).tolist() == [True, False]
