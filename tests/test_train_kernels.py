"""`hive-train`'s attention kernel flag and the dtype a stage trains in (issue 42, finding 4)."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from test_train import SMALL, hive_train

from hive_adapter.data.synthetic import caption_vocabulary
from hive_adapter.model.modeling_hive import HiveForConditionalGeneration
from hive_adapter.tools.toy_models import write_toy_models
from hive_adapter.training.cli_arguments import HiveArguments, ModelArguments
from hive_adapter.training.stage_inputs import compose_stage0

COMMON = ["--data_format", "synthetic", "--synthetic_size", 16, "--stage", "1", "--max_steps", 1,
          "--global_batch_size", 4, "--per_device_train_batch_size", 4, "--report_to", "none",
          "--save_strategy", "no"]  # fmt: skip


@pytest.fixture(scope="module")
def bf16_stage0(tmp_path_factory):
    """A composed stage 0 saved in bf16 (as a bf16 run, or a bf16 base model, leaves it)."""
    root = tmp_path_factory.mktemp("kernels")
    vision, language = write_toy_models(root / "toy", caption_vocabulary(), sizes=SMALL)
    model_args = ModelArguments(vision_model=str(vision), language_model=str(language))
    compose_stage0(model_args, HiveArguments(hive_tokens_per_level=4), root / "fp32", seed=0)
    shutil.copytree(root / "fp32", root / "bf16")
    HiveForConditionalGeneration.from_pretrained(root / "fp32").to(torch.bfloat16).save_pretrained(root / "bf16")
    return root / "bf16"


def saved_dtypes(directory) -> set[str]:
    with safe_open(directory / "model.safetensors", "pt") as weights:
        return {str(weights.get_slice(name).get_dtype()) for name in weights.keys()}  # noqa: SIM118


def test_a_bf16_stage_resumes_in_float32_and_the_kernel_flag_reaches_lm_and_hive(bf16_stage0, tmp_path):
    assert "BF16" in saved_dtypes(bf16_stage0)
    hive_train("--model_name_or_path", bf16_stage0, *COMMON, "--output_dir", tmp_path / "a")
    assert saved_dtypes(tmp_path / "a" / "stage1") == {"F32"}  # trained on float32 weights (a master copy)
    report = json.loads((tmp_path / "a" / "stage1" / "hive_stage.json").read_text())
    assert report["attn_implementation"] == {"language_model": "sdpa", "hive": ["sdpa"]}

    hive_train(
        "--model_name_or_path", bf16_stage0, *COMMON, "--output_dir", tmp_path / "b", "--attn_implementation", "eager"
    )
    report = json.loads((tmp_path / "b" / "stage1" / "hive_stage.json").read_text())
    assert report["attn_implementation"] == {"language_model": "eager", "hive": ["eager"]}


def test_an_unknown_kernel_is_refused_by_name(tmp_path):
    result = hive_train("--attn_implementation", "flash", "--output_dir", tmp_path, check=False)
    assert result.returncode != 0 and "flash_attention_2" in result.stderr and "'flash'" in result.stderr
