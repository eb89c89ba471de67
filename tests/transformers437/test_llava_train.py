"""LLaVA's real `train()` with `--vision_connector hive`, in LLaVA's pinned world (transformers 4.37.2).

Each stage is a LLaVA command line (scripts/v1_5/pretrain.sh, finetune.sh) with only the entry point
changed and the HIVE flag added; the outputs are then read the way LLaVA reads them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("llava.train.train")

from llava_helpers import (
    REPO,
    assert_trained_on_real_labels,
    checkout_path,
    finetune_command,
    logged_losses,
    patched_llava_checkout,
    pretrain_command,
    run_llava,
)

from hive_adapter.integrations.llava.settings import settings_in_adapter_file
from hive_adapter.integrations.llava.toy import write_llava_toy


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_llava_toy(tmp_path_factory.mktemp("llava-toy"), samples=32)


@pytest.fixture(scope="module")
def stage1(toy, tmp_path_factory):
    output = tmp_path_factory.mktemp("runs") / "llava-hive-pretrain"
    log = run_llava(
        pretrain_command(
            toy, output, "--vision_connector", "hive", "--hive_vision_layers", "1,3,5,7", "--hive_llm_layers", "0,1,2,3"
        )
    )
    return output, log


@pytest.fixture(scope="module")
def stage2(toy, stage1, tmp_path_factory):
    output = tmp_path_factory.mktemp("runs") / "llava-hive-finetune"
    log = run_llava(
        finetune_command(
            toy,
            output,
            "--vision_connector",
            "hive",
            "--pretrain_mm_mlp_adapter",
            str(stage1[0] / "mm_projector.bin"),
            "--mm_projector_lr",
            "1e-3",
        )
    )
    return output, log


def load(path: Path, base: Path | None = None):
    """`llava.model.builder.load_pretrained_model`, as llava.eval.run_llava calls it (CPU)."""
    from hive_adapter.integrations.llava import apply_patch

    apply_patch()
    from llava.mm_utils import get_model_name_from_path
    from llava.model.builder import load_pretrained_model

    return load_pretrained_model(
        str(path), None if base is None else str(base), get_model_name_from_path(str(path)), device="cpu"
    )


def ask(tokenizer, model, processor, toy, *, use_cache: bool = True) -> torch.Tensor:
    """One run_llava-style query: conversation template, tokenizer_image_token, process_images, generate."""
    from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
    from llava.conversation import conv_templates
    from llava.mm_utils import process_images, tokenizer_image_token
    from PIL import Image

    conversation = conv_templates["llava_v1"].copy()
    conversation.append_message(conversation.roles[0], DEFAULT_IMAGE_TOKEN + "\nWhat is in the image?")
    conversation.append_message(conversation.roles[1], None)
    ids = tokenizer_image_token(conversation.get_prompt(), tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")[None]
    image = Image.open(toy["data"] / "images" / "00000.png").convert("RGB")
    pixels = process_images([image], processor, model.config).to(model.device, dtype=model.dtype)
    return model.generate(
        ids, images=pixels, image_sizes=[image.size], do_sample=False, max_new_tokens=6, use_cache=use_cache
    )


def test_stage1_trains_exactly_the_hive_modules(stage1):
    output, log = stage1
    assert_trained_on_real_labels(log)
    assert "vision tower 0, language model 0" in log  # the trainable-parameter report of hooks.prepare_for_training
    weights = torch.load(output / "mm_projector.bin", map_location="cpu", weights_only=True)
    assert weights and all(key.startswith("model.mm_projector.hive_") for key in weights)
    assert {k for k in weights if k.endswith("_gate")} == {
        f"model.mm_projector.hive_blocks.{i}.hive_attn_gate" for i in range(4)
    }
    assert all(weights[k].abs().item() > 0 for k in weights if k.endswith("_gate"))  # gates left zero
    config = json.loads((output / "config.json").read_text())
    assert config["mm_projector_type"] == "hive"
    assert config["hive_config"]["vision_layers"] == [1, 3, 5, 7]
    assert config["hive_config"]["llm_layers"] == [0, 1, 2, 3]


def test_default_connector_is_llava_unchanged(toy, tmp_path):
    log = run_llava(pretrain_command(toy, tmp_path / "llava-mlp-pretrain", "--max_steps", "2"))
    assert_trained_on_real_labels(log)
    weights = torch.load(tmp_path / "llava-mlp-pretrain" / "mm_projector.bin", map_location="cpu", weights_only=True)
    assert sorted(weights) == [f"model.mm_projector.{i}.{p}" for i in (0, 2) for p in ("bias", "weight")]
    assert 'mm_projector_type": "mlp2x_gelu' in (tmp_path / "llava-mlp-pretrain" / "config.json").read_text()


def test_stage2_loads_adapter_trains_llm_and_reloads_for_generation(toy, stage1, stage2):
    output, log = stage2
    assert_trained_on_real_labels(log)
    losses = logged_losses(log)
    assert len(losses) == 4
    saved = load_file(output / "model.safetensors")
    adapter = torch.load(stage1[0] / "mm_projector.bin", map_location="cpu", weights_only=True)
    assert set(adapter) <= set(saved)  # every HIVE weight sits in the full checkpoint, under upstream names
    assert any((saved[k] - adapter[k]).abs().max() > 0 for k in adapter)  # and went on training
    base = load_file(toy["vicuna"] / "model.safetensors")
    assert "model.layers.0.self_attn.q_proj.weight" in saved  # the LLM keeps upstream's parameter names
    assert (
        saved["model.layers.0.self_attn.q_proj.weight"] - base["model.layers.0.self_attn.q_proj.weight"]
    ).abs().max() > 0

    tokenizer, model, processor, _ = load(output)
    reloaded = {k: v for k, v in model.state_dict().items() if "mm_projector" in k}
    assert set(reloaded) == set(adapter)
    for key, value in reloaded.items():
        torch.testing.assert_close(value, saved[key].to(value.dtype), rtol=0, atol=0)
    cached, uncached = ask(tokenizer, model, processor, toy), ask(tokenizer, model, processor, toy, use_cache=False)
    assert cached.shape[1] >= 2 and torch.equal(cached, uncached)


def test_projector_only_checkpoint_reloads_with_model_base(toy, stage1):
    """LLaVA's "mm projector only" route: load_pretrained_model(stage-1 dir, model_base=the LLM)."""
    output = stage1[0]
    renamed = output.parent / "llava-hive-projector-only"
    shutil.copytree(output, renamed)
    tokenizer, model, processor, _ = load(renamed, base=toy["vicuna"])
    adapter = torch.load(output / "mm_projector.bin", map_location="cpu", weights_only=True)
    state = model.state_dict()
    for key, value in adapter.items():
        # LLaVA's builder casts mm_projector.bin to fp16 before loading it; HIVE's gates and norms keep that value
        # in float32 (the other tensors are fp16 like the model)
        torch.testing.assert_close(state[key], value.to(torch.float16).to(state[key].dtype))
    assert ask(tokenizer, model, processor, toy).shape[1] >= 2


def test_lora_excludes_hive_and_saves_it_with_non_lora_trainables(toy, stage1, tmp_path):
    output = tmp_path / "llava-hive-lora"
    log = run_llava(
        finetune_command(
            toy,
            output,
            "--vision_connector",
            "hive",
            "--lora_enable",
            "True",
            "--lora_r",
            "8",
            "--lora_alpha",
            "16",
            "--max_steps",
            "2",
            "--pretrain_mm_mlp_adapter",
            str(stage1[0] / "mm_projector.bin"),
        )
    )
    assert_trained_on_real_labels(log)
    non_lora = torch.load(output / "non_lora_trainables.bin", map_location="cpu", weights_only=True)
    assert any("mm_projector.hive_blocks" in key for key in non_lora)
    lora = load_file(output / "adapter_model.safetensors")
    assert lora and not any("hive_" in key or "mm_projector" in key for key in lora)
    tokenizer, model, processor, _ = load(output, base=toy["vicuna"])  # merges LoRA, loads HIVE weights
    assert ask(tokenizer, model, processor, toy).shape[1] >= 2


def test_stage3_unfreezes_the_vision_tower_and_reloads_it(toy, stage2, tmp_path):
    output = tmp_path / "llava-hive-stage3"
    command = finetune_command(
        toy,
        output,
        "--vision_connector",
        "hive",
        "--unfreeze_vision_tower",
        "True",
        "--max_steps",
        "2",
        "--learning_rate",
        "1e-3",
    )
    command[command.index("--model_name_or_path") + 1] = str(stage2[0])
    log = run_llava(command)
    assert_trained_on_real_labels(log)
    assert "vision tower 0," not in log  # the tower trains
    saved = load_file(output / "model.safetensors")
    clip = load_file(toy["clip"] / "model.safetensors")
    key = "vision_model.encoder.layers.0.self_attn.q_proj.weight"
    trained = saved[f"model.vision_tower.vision_tower.{key}"]
    assert (trained - clip[key]).abs().max() > 0
    assert json.loads((output / "config.json").read_text())["unfreeze_mm_vision_tower"] is True
    _, model, _, _ = load(output)
    tower = model.get_vision_tower().vision_tower.state_dict()[key]
    torch.testing.assert_close(tower, trained.to(tower.dtype))  # the trained tower, not the original CLIP


def test_adapter_from_other_hive_settings_is_refused(toy, stage1, tmp_path):
    command = finetune_command(
        toy,
        tmp_path / "llava-refused",
        "--vision_connector",
        "hive",
        "--hive_vision_layers",
        "2,5",
        "--hive_llm_layers",
        "1,3",
        "--pretrain_mm_mlp_adapter",
        str(stage1[0] / "mm_projector.bin"),
    )
    result = subprocess.run(
        command, capture_output=True, text=True, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert result.returncode != 0
    assert "was trained with other HIVE settings" in result.stderr and "vision_layers" in result.stderr


def test_a_lone_projector_file_carries_its_settings(toy, stage1, tmp_path):
    """mm_projector.bin copied without the config.json beside it: contradicting --hive_* flags are refused by
    name, and without flags the adapter's own settings (not the defaults) are used and recorded."""
    lone = tmp_path / "copied" / "mm_projector.bin"
    lone.parent.mkdir()
    shutil.copy(stage1[0] / "mm_projector.bin", lone)
    refused = finetune_command(
        toy, tmp_path / "refused", "--vision_connector", "hive", "--hive_vision_layers", "1,5",
        "--hive_llm_layers", "0,1", "--pretrain_mm_mlp_adapter", str(lone),
    )  # fmt: skip
    result = subprocess.run(
        refused, capture_output=True, text=True, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert result.returncode != 0
    assert "vision_layers: adapter [1, 3, 5, 7], asked [1, 5]" in result.stderr, result.stderr[-3000:]
    output = tmp_path / "kept"
    run_llava(
        finetune_command(
            toy, output, "--vision_connector", "hive", "--pretrain_mm_mlp_adapter", str(lone), "--max_steps", "1"
        )
    )
    recorded = json.loads((output / "config.json").read_text())["hive_config"]
    assert recorded["vision_layers"] == [1, 3, 5, 7] and recorded["llm_layers"] == [0, 1, 2, 3]


def test_patch_files_apply_to_the_released_llava_and_train(toy, tmp_path):
    """`git apply` patches/llava/*.patch onto the llava-torch 1.2.2.post1 sources, then run that copy's own
    `llava/train/train.py` (no apply_patch) with the HIVE flag."""
    tree = patched_llava_checkout(tmp_path / "LLaVA")
    command = pretrain_command(
        toy, tmp_path / "llava-patched-pretrain", "--vision_connector", "hive", "--max_steps", "2"
    )
    command[1:3] = [str(tree / "llava" / "train" / "train.py")]
    log = run_llava(command, env={"PYTHONPATH": checkout_path(tree)})
    assert "LLaVA patched" not in log  # the checkout's own code, not the runtime patch
    assert_trained_on_real_labels(log)
    weights = torch.load(
        tmp_path / "llava-patched-pretrain" / "mm_projector.bin", map_location="cpu", weights_only=True
    )
    assert weights and all(key.startswith("model.mm_projector.hive_") for key in weights)
    recorded = json.loads((tmp_path / "llava-patched-pretrain" / "config.json").read_text())["hive_config"]
    assert settings_in_adapter_file(tmp_path / "llava-patched-pretrain" / "mm_projector.bin") == recorded
