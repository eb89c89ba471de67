"""hive-train stage 1 over HIVE models whose encoders are VLM families' own (issue 37): Qwen2.5-VL's ViT with its
image processor (packed patches + image_grid_thw) and SmolVLM's encoder with Idefics3's image processor (crops +
pixel_attention_mask). The collator passes what the image processor says the model takes."""

from __future__ import annotations

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
def language_dir(tmp_path_factory):
    return toy_models(tmp_path_factory.mktemp("toy"))[1]


@pytest.mark.parametrize("family", sorted(FAMILY_ENCODERS))
def test_hive_train_stage_1_runs_over_a_family_encoder(family, language_dir, tmp_path):
    build, image_processor = FAMILY_ENCODERS[family]
    torch.manual_seed(0)
    model = hive.HiveForConditionalGeneration.from_vision_text(
        build().get_encoder(modality="image"),
        AutoModelForCausalLM.from_pretrained(language_dir),
        hive.HiveConfig(vision_layers=[1, 3]),
    )
    start = tmp_path / family
    model.save_pretrained(start)
    AutoTokenizer.from_pretrained(language_dir).save_pretrained(start)
    image_processor().save_pretrained(start)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "hive_adapter.training.train",
            "--model_name_or_path",
            str(start),
            "--stage",
            "1",
            "--data_format",
            "synthetic",
            "--synthetic_size",
            "8",
            "--global_batch_size",
            "4",
            "--per_device_train_batch_size",
            "4",
            "--output_dir",
            str(tmp_path / "out"),
            "--report_to",
            "none",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "stage 1 step 2/2" in run.stdout
    before, after = load_file(start / "model.safetensors"), load_file(tmp_path / "out" / "stage1" / "model.safetensors")
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    assert moved and all(name.startswith("hive_") for name in moved), sorted(moved)[:5]


def test_a_non_finite_packed_image_is_named_by_its_image_not_its_patch():
    grid = torch.tensor([[1, 2, 2], [1, 2, 4]])
    pixels = torch.zeros(12, 5)
    pixels[7, 0] = float("nan")  # a patch of the second image
    assert image_is_finite({"pixel_values": pixels, "image_grid_thw": grid}, 2).tolist() == [True, False]
