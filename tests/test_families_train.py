"""hive-train over HIVE models whose encoders are VLM families' own (issue 37): Qwen2.5-VL's ViT with its image
processor (packed patches + image_grid_thw) through stages 1, 2 and 3, and SmolVLM's encoder with Idefics3's image
processor (crops + pixel_attention_mask) composed straight from a saved SmolVLM (`--vision_model` of the family's
own directory). The collator passes what the image processor says the model takes. A family's saved VLM given as
`--model_name_or_path` (where a HIVE checkpoint goes) is refused naming the route that works."""

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
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

import hive_adapter as hive
from hive_adapter.data.collator import image_is_finite
from hive_adapter.model.loading import load_vision_encoder

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
    starts = {"language": language_dir}
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


def hive_train(*args: str, ranks: int = 1, stage: str = "1") -> subprocess.CompletedProcess:
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks)] if ranks > 1 else []
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, *launcher, "-m", "hive_adapter.training.train", "--stage", stage, *args],
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


COMMON = ["--data_format", "synthetic", "--synthetic_size", "8", "--global_batch_size", "4",
          "--report_to", "none", "--save_strategy", "no", "--seed", "0"]  # fmt: skip


@pytest.fixture(scope="module")
def family_vlms(tmp_path_factory):
    """family -> the family's own tiny VLM saved with its image processor, as a user has it on disk."""
    root = tmp_path_factory.mktemp("family_vlms")
    saved = {}
    for family, (build, image_processor) in FAMILY_ENCODERS.items():
        saved[family] = root / family
        build(seed=2).save_pretrained(saved[family])
        image_processor().save_pretrained(saved[family])
    return saved


def parameters_equal(reference: torch.nn.Module, directory: Path, prefix: str) -> bool:
    """Whether the `prefix` tensors saved in `directory` are `reference`'s state, bit for bit."""
    saved = {
        name[len(prefix) :]: t
        for name, t in load_file(directory / "model.safetensors").items()
        if name.startswith(prefix)
    }
    state = reference.state_dict()
    return saved.keys() == state.keys() and all(torch.equal(saved[name], state[name]) for name in state)


def parts(names: set[str]) -> set[str]:
    return {name.split(".")[0] if not name.startswith("hive_") else "hive" for name in names}


@pytest.mark.parametrize("family", sorted(FAMILY_ENCODERS))
def test_a_family_vlms_saved_directory_gives_its_own_encoder_weights(family, family_vlms):
    """`--vision_model` of a saved family VLM: the encoder HIVE composes over is that VLM's, with its weights (not
    the encoder class initialised afresh from a checkpoint whose keys it does not find)."""
    encoder = load_vision_encoder(family_vlms[family])
    reference = AutoModelForImageTextToText.from_pretrained(family_vlms[family]).get_encoder(modality="image")
    assert type(encoder) is type(reference)
    state = reference.state_dict()
    assert encoder.state_dict().keys() == state.keys()
    assert all(torch.equal(tensor, state[name]) for name, tensor in encoder.state_dict().items())


def test_a_saved_base_vlm_without_an_lm_head_gives_its_encoder_and_a_missing_encoder_weight_is_refused(tmp_path):
    """Qwen2.5-VL saved as its base model (AutoModel: no lm_head) still gives its encoder: only the encoder's own
    weights must be in the checkpoint. One of the encoder's weights taken out of the file is refused, named."""
    from safetensors.torch import save_file

    vlm = build_qwen2_5_vl(seed=2)
    vlm.model.save_pretrained(tmp_path)
    state = vlm.get_encoder(modality="image").state_dict()
    encoder = load_vision_encoder(tmp_path)
    assert all(torch.equal(tensor, state[name]) for name, tensor in encoder.state_dict().items())
    weights = load_file(tmp_path / "model.safetensors")
    dropped = next(name for name in weights if "visual.blocks.1." in name)
    save_file({name: t for name, t in weights.items() if name != dropped}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})  # fmt: skip
    with pytest.raises(ValueError, match=r"left 1 of its weights uninitialised .*blocks\.1\."):
        load_vision_encoder(tmp_path)


def test_a_saved_llava_gives_its_own_clip_tower_weights(tmp_path):
    """llava-hf's LLaVA-1.5 directory as --vision_model: its CLIP tower with its weights, not a fresh CLIPVisionModel."""
    from tiny_models import build_llava

    build_llava(seed=2).save_pretrained(tmp_path)
    encoder = load_vision_encoder(tmp_path)
    state = AutoModelForImageTextToText.from_pretrained(tmp_path).get_encoder(modality="image").state_dict()
    assert encoder.state_dict().keys() == state.keys()
    assert all(torch.equal(tensor, state[name]) for name, tensor in encoder.state_dict().items())


def test_hive_train_composes_over_a_saved_family_vlm_and_runs_stage_1(family_vlms, family_starts, tmp_path):
    """SmolVLM's own saved directory as --vision_model, a causal LM as --language_model: stage 0 holds SmolVLM's
    encoder with its weights, stage 1 moves HIVE's parameters only."""
    vlm = family_vlms["smolvlm"]
    language_dir = family_starts["language"]
    run = hive_train("--vision_model", str(vlm), "--language_model", str(language_dir), "--hive_vision_layers", "1,3",
                     *COMMON, "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path))  # fmt: skip
    assert "stage 1 step 2/2" in run.stdout
    encoder = AutoModelForImageTextToText.from_pretrained(vlm).get_encoder(modality="image")
    assert parameters_equal(encoder, tmp_path / "stage0", "vision_model.")
    moved = moved_parameters(tmp_path / "stage0", tmp_path / "stage1")
    assert moved and parts(moved) == {"hive"}, sorted(moved)[:5]


def test_hive_train_stages_1_2_3_over_a_qwen_encoder_train_the_right_parts(family_starts, tmp_path):
    """Stage 1 moves HIVE only; stage 2 HIVE and the language model, the vision encoder bit-identical; stage 3 the
    vision encoder too. Each stage's directory loads through AutoModelForImageTextToText and reads packed patches.
    (One run of the three stages: one process start instead of three.)"""
    from family_models import qwen_pixels

    start = family_starts["qwen2_5_vl"]
    run = hive_train("--model_name_or_path", str(start), *COMMON, "--per_device_train_batch_size", "4",
                     "--output_dir", str(tmp_path), stage="1,2,3")  # fmt: skip
    assert all(f"stage {n}: " in run.stdout for n in (1, 2, 3)), run.stdout[-2000:]
    stage1, stage2, stage3 = (tmp_path / f"stage{n}" for n in (1, 2, 3))
    assert parts(moved_parameters(start, stage1)) == {"hive"}
    assert parts(moved_parameters(stage1, stage2)) == {"hive", "language_model"}
    assert parts(moved_parameters(stage2, stage3)) == {"hive", "language_model", "vision_model"}
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    for directory in (stage1, stage2, stage3):
        model = AutoModelForImageTextToText.from_pretrained(directory).eval()
        assert type(model) is hive.HiveForConditionalGeneration
        with torch.no_grad():
            assert torch.isfinite(model(input_ids=ids, **qwen_pixels(0)).logits).all()


def test_a_family_vlm_as_model_name_or_path_is_refused_naming_the_route(family_vlms, tmp_path):
    """--model_name_or_path takes a HIVE checkpoint; a family's own VLM there is refused by its model type, saying
    to compose over its encoder with --vision_model (or to wrap it with get_hive_model in one's own loop)."""
    from hive_adapter.training.cli_arguments import ModelArguments
    from hive_adapter.training.hive_flags import HiveArguments
    from hive_adapter.training.plan import plan_stages
    from hive_adapter.training.stages import parse_stages

    vlm = family_vlms["qwen2_5_vl"]
    with pytest.raises(
        ValueError, match=rf"{vlm} holds a qwen2_5_vl model, not a HIVE checkpoint.*--vision_model {vlm}"
    ):
        plan_stages(parse_stages("1"), tmp_path, model_args=ModelArguments(model_name_or_path=str(vlm)),
                    hive_args=HiveArguments(), explicit=set(), command="hive-train")  # fmt: skip


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
