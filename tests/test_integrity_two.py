"""No silent wrong results, round two (issue 24): each test is a case a hostile pass found giving a wrong result
without a word on the issue's main, then the behaviour that replaced it.

The fault test of item 1 (a NaN injected mid-stage under checkpointing) is in `tests/test_fault_injection.py`;
the property-based tests of the layout invariants in `tests/test_layout_properties.py`.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny_models import IMAGE_TOKEN, build_text, build_vision, set_gates, text_ids, vision_inputs

import hive_adapter as hive
from hive_adapter.data.datasets import llava_entry, read_records
from hive_adapter.data.synthetic import caption_vocabulary
from hive_adapter.tools.toy_models import ToySizes, write_toy_models
from hive_adapter.training.train import main as train_main

SMALL = ToySizes(image_size=32, patch_size=8, vision_width=32, vision_layers=4, text_width=64, text_layers=2)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
FAST = ["--global_batch_size", "8", "--per_device_train_batch_size", "8", "--hive_tokens_per_level", "4",
        "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "True", "--seed", "0"]  # fmt: skip


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_toy_models(tmp_path_factory.mktemp("toy"), caption_vocabulary(), sizes=SMALL)


def toy_args(toy, out: Path, *extra) -> list[str]:
    vision, language = toy
    return [*map(str, ["--vision_model", vision, "--language_model", language, "--data_format", "synthetic",
                       "--synthetic_size", 16, "--output_dir", out, *extra]), *FAST]  # fmt: skip


def hive_train_cli(*args, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hive_adapter.training.train", *map(str, args)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=timeout,
    )


def non_finite_tensors(path: Path) -> list[str]:
    with safe_open(str(path), framework="pt") as weights:
        return [key for key in weights.keys() if not torch.isfinite(weights.get_tensor(key)).all()]


# ---------------------------------------------------------------------- 1. a diverged run installed as finished
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--stage", "1", "--hive_learning_rate", "nan"], r"--hive_learning_rate nan: must be a finite number above 0"),
        (["--stage", "1", "--hive_learning_rate", "inf"], r"--hive_learning_rate inf: must be a finite number above 0"),
        (["--learning_rate", "inf"], r"--learning_rate inf: must be a finite number above 0"),
        (["--max_grad_norm", "nan"], r"--max_grad_norm nan: must be a finite number"),
        (["--weight_decay", "nan"], r"--weight_decay nan: must be a finite number"),
        (["--adam_beta2", "inf"], r"--adam_beta2 inf: must be a finite number"),
    ],
)
def test_non_finite_rates_and_settings_are_refused_before_anything_runs(tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        train_main(["--data_format", "synthetic", "--output_dir", str(tmp_path / "run"), "--report_to", "none", *flags])
    assert not (tmp_path / "run").exists()


def test_a_stage_whose_loss_goes_non_finite_stops_naming_the_step_and_is_not_installed(toy, tmp_path, monkeypatch):
    """A batch that makes the loss NaN (here: the loss of step 3 multiplied by NaN, as an fp16 overflow or a
    poisoned sample would) stops the stage before its optimiser step: no NaN reaches the weights, nothing is
    installed, and the error names the stage and the step."""
    from hive_adapter.training.trainer import HiveTrainer, TrainingDiverged

    original = HiveTrainer.compute_loss

    def poisoned(self, model, inputs, *args, **kwargs):
        loss = original(self, model, inputs, *args, **kwargs)
        if self.state.global_step == 2:  # the third optimiser step
            loss = loss * float("nan") if not isinstance(loss, tuple) else (loss[0] * float("nan"), *loss[1:])
        return loss

    monkeypatch.setattr(HiveTrainer, "compute_loss", poisoned)
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"stage 1 diverged at step 3\b.*loss nan.*not installed"):
        train_main(toy_args(toy, out, "--stage", "1", "--max_steps", "6"))
    assert not (out / "stage1").exists()
    assert (out / "stage0").is_dir()


def test_a_non_finite_learning_rate_inside_the_optimiser_never_installs_the_stage(toy, tmp_path, monkeypatch):
    """The last line of defence: weights that went non-finite by any route are caught before the stage is
    installed (here the optimiser's rate is NaN from the start, bypassing the argument check)."""
    from hive_adapter.training.trainer import HiveTrainer, TrainingDiverged

    original = HiveTrainer.create_optimizer

    def nan_rate(self, model=None):
        optimizer = original(self, model)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] = float("nan")
        return optimizer

    monkeypatch.setattr(HiveTrainer, "create_optimizer", nan_rate)
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"stage 1 diverged at step 2\b"):
        train_main(toy_args(toy, out, "--stage", "1", "--max_steps", "4"))
    assert not (out / "stage1").exists()


def test_hive_train_cli_reports_divergence_as_an_error_not_a_success(toy, tmp_path):
    out = tmp_path / "run"
    done = hive_train_cli(*toy_args(toy, out, "--stage", "1,2", "--hive_learning_rate", "nan"))
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "--hive_learning_rate nan" in done.stderr
    assert "done:" not in done.stdout and not (out / "stage2").exists()


# ---------------------------------------------------------------------- 2. a left-out image and the next one
@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
def test_a_left_out_first_image_leaves_the_second_image_to_the_text_after_it(kernel):
    """Marker mode, two images in one sample, the first with NaN pixels: text between the markers sees no image,
    text after the second marker sees the second image exactly as it does when the first image is fine."""
    config = hive.HiveConfig(
        vision_layers=[1, 3], llm_layers=[0, 2], image_token_id=IMAGE_TOKEN, cross_attn_implementation=kernel
    )
    model = hive.HiveForConditionalGeneration.from_vision_text(build_vision("clip"), build_text("llama"), config)
    set_gates(model, 0.5)
    model.eval()
    ids = text_ids(1, 12)
    ids[0, 2], ids[0, 7] = IMAGE_TOKEN, IMAGE_TOKEN
    good = vision_inputs("clip", 2)["pixel_values"]
    bad = good.clone()
    bad[0, :, :4] = float("nan")
    # What the model must compute: the same embeddings (marker 1's included), with only marker 2 placing an
    # image (markers are read from input_ids when inputs_embeds come alongside).
    only_second = ids.clone()
    only_second[0, 2] = 1
    with torch.no_grad():
        with_bad_first = model(input_ids=ids, pixel_values=bad).logits
        expected = model(
            input_ids=only_second, inputs_embeds=model.get_input_embeddings()(ids), pixel_values=good[1:]
        ).logits
        both_bad = model(input_ids=ids, pixel_values=torch.full_like(good, float("nan"))).logits
        text_only = build_text("llama").eval()(input_ids=ids).logits
    torch.testing.assert_close(with_bad_first, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(with_bad_first[:, :7], text_only[:, :7], rtol=1e-5, atol=1e-5)
    assert (with_bad_first[:, 7:] - both_bad[:, 7:]).abs().max() > 1e-3  # the second image is seen


# ---------------------------------------------------------------------- 3. hive-reproduce's outputs
def test_hive_reproduce_refuses_results_it_did_not_write_before_any_work(tmp_path):
    from hive_adapter.analysis.reproduce import main as reproduce_main

    out = tmp_path / "results"
    out.mkdir()
    (out / "reproduce.md").write_text("my own notes\n")
    with pytest.raises(SystemExit, match=r"reproduce.md.*not written by hive-reproduce"):
        reproduce_main(["--quick", "--output_dir", str(out), "--work_dir", str(tmp_path / "work")])
    assert (out / "reproduce.md").read_text() == "my own notes\n"
    assert not (tmp_path / "work").exists()  # refused before any work


def test_hive_reproduce_refuses_a_work_dir_built_with_another_budget(tmp_path):
    from hive_adapter.analysis.reproduce import main as reproduce_main
    from hive_adapter.analysis.reproduce import parse_arguments, work_settings
    from hive_adapter.analysis.reproduce_settings import WORK_RECORD

    work = tmp_path / "work"
    work.mkdir()
    args, budget, connectors = parse_arguments(["--quick", "--train_size", "16", "--language_pretraining_steps", "0"])
    (work / WORK_RECORD).write_text(json.dumps(work_settings(args, budget)))
    with pytest.raises(
        SystemExit, match=r"language_pretraining_steps: 0 there, 20 asked.*train_size: 16 there, 48 asked"
    ):
        reproduce_main(["--quick", "--train_size", "48", "--language_pretraining_steps", "20",
                        "--output_dir", str(tmp_path / "out"), "--work_dir", str(work)])  # fmt: skip
    (work / WORK_RECORD).unlink()
    (work / "seed0").mkdir()
    with pytest.raises(SystemExit, match=r"not written by hive-reproduce"):
        reproduce_main(["--quick", "--output_dir", str(tmp_path / "out"), "--work_dir", str(work)])


# ---------------------------------------------------------------------- 4. multi-turn data cut to its first turn
def test_the_pre_training_reader_names_entries_whose_later_turns_it_would_drop(tmp_path, caplog):
    entries = [
        llava_entry("one-turn", "a.png", ["<image>\nDescribe.", "A red square."]),
        llava_entry("three-turns", "b.png", ["<image>\nWhat is it?", "A square.", "Colour?", "Red."]),
    ]
    (tmp_path / "data.json").write_text(json.dumps(entries))
    records = read_records(tmp_path / "data.json", "llava")
    assert len(records) == 2
    assert "1 of 2 entries have more than one human/gpt round" in caplog.text
    assert "three-turns" in caplog.text and "only its first round is trained" in caplog.text


# ---------------------------------------------------------------------- 5. resume with other run settings
def test_resume_with_settings_that_change_what_a_step_means_is_refused(toy, tmp_path):
    out = tmp_path / "run"
    first = [*toy_args(toy, out, "--stage", "1", "--max_steps", "4", "--synthetic_size", "32"), "--save_strategy",
             "steps", "--save_steps", "2"]  # fmt: skip
    # killed after its checkpoints: simulate by running to the end and removing the installed stage
    train_main(first)
    import shutil

    shutil.rmtree(out / "stage1")
    changed = [*first, "--global_batch_size", "16", "--resume_from_checkpoint", "auto"]
    with pytest.raises(ValueError, match=r"checkpoint-4 .*--global_batch_size 16 \(the checkpoint: 8\)"):
        train_main(changed)
    changed = [*first, "--learning_rate", "3e-3", "--resume_from_checkpoint", "auto"]
    with pytest.raises(ValueError, match=r"--learning_rate 0.003 \(the checkpoint: 0.001\)"):
        train_main(changed)


def test_resume_with_another_batch_split_or_packing_of_the_same_global_batch_says_so(toy, tmp_path, capsys):
    out = tmp_path / "run"
    first = [*toy_args(toy, out, "--stage", "1", "--max_steps", "4", "--synthetic_size", "32"), "--save_strategy",
             "steps", "--save_steps", "2"]  # fmt: skip
    train_main(first)
    import shutil

    shutil.rmtree(out / "stage1")
    capsys.readouterr()
    train_main([*first, "--per_device_train_batch_size", "4", "--packing", "--resume_from_checkpoint", "auto"])
    said = capsys.readouterr().out
    assert (
        "per-device batch 4 x 2 accumulation x 1 rank, packed rows of 77 (the checkpoint: 8 x 1 x 1, padded rows)"
        in said
    )
    assert (out / "stage1").is_dir()


# ---------------------------------------------------------------------- 6. NaFlex grids that pool differently
def test_siglip2_images_with_different_grids_pool_to_one_masked_layout():
    config = hive.HiveConfig(vision_layers=[1, 3], llm_layers=[0, 2], tokens_per_level=16)
    model = hive.HiveForConditionalGeneration.from_vision_text(build_vision("siglip2"), build_text("llama"), config)
    set_gates(model, 0.5)
    model.eval()
    inputs = vision_inputs("siglip2", 2)
    inputs["spatial_shapes"] = torch.tensor([[2, 8], [4, 4]])  # 16 patches each, grids differ
    levels, mask = model.hive_encode_images(**inputs)
    assert [tuple(level.shape[:2]) for level in levels] == [(2, 16)] * 2
    assert mask is not None and mask.sum(1).tolist() == [8, 16]  # 2x8 pools to 2x4, 4x4 stays
    ids = text_ids(2, 6)
    with torch.no_grad():
        both = model(input_ids=ids, **inputs).logits
        alone = model(
            input_ids=ids[:1],
            pixel_values=inputs["pixel_values"][:1],
            pixel_attention_mask=inputs["pixel_attention_mask"][:1],
            spatial_shapes=inputs["spatial_shapes"][:1],
        ).logits
    torch.testing.assert_close(both[:1], alone, rtol=1e-5, atol=1e-5)  # padding never changes an answer


def test_concat_splices_each_naflex_image_with_its_own_token_count():
    config = hive.HiveConfig(vision_layers=[1, 3], connector="concat", tokens_per_level=16, image_token_id=IMAGE_TOKEN)
    model = hive.HiveForConditionalGeneration.from_vision_text(build_vision("siglip2"), build_text("llama"), config)
    model.eval()
    inputs = vision_inputs("siglip2", 2)
    inputs["spatial_shapes"] = torch.tensor([[2, 8], [4, 4]])
    ids = text_ids(2, 6, marker_at=1)
    with torch.no_grad():
        both = model(input_ids=ids, attention_mask=torch.ones_like(ids), **inputs).logits
        first = model(
            input_ids=ids[:1],
            pixel_values=inputs["pixel_values"][:1],
            pixel_attention_mask=inputs["pixel_attention_mask"][:1],
            spatial_shapes=inputs["spatial_shapes"][:1],
        ).logits
    assert both.shape[1] == 6 - 1 + 16 and first.shape[1] == 6 - 1 + 8  # 2x8 pools to 8 tokens, 4x4 keeps 16
    torch.testing.assert_close(both[:1, : first.shape[1]], first, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------- 7. precision drift
def gate_and_norm_dtypes(model: torch.nn.Module) -> set[torch.dtype]:
    return {
        param.dtype
        for name, param in model.named_parameters()
        if "hive_attn_gate" in name or "hive_ffn_gate" in name or "_norm." in name and "hive_" in name
    }


@pytest.mark.parametrize("cast", ["to_bf16", "half", "bfloat16", "to_device_and_dtype"])
def test_casting_a_hive_model_keeps_gates_and_norms_float32(cast):
    config = hive.HiveConfig(vision_layers=[1, 3], llm_layers=[0, 2], use_ffn=True)
    model = hive.HiveForConditionalGeneration.from_vision_text(build_vision("clip"), build_text("llama"), config)
    casts = {
        "to_bf16": lambda m: m.to(torch.bfloat16),
        "half": lambda m: m.half(),
        "bfloat16": lambda m: m.bfloat16(),
        "to_device_and_dtype": lambda m: m.to("cpu", torch.float16),
    }
    model = casts[cast](model)
    assert gate_and_norm_dtypes(model) == {torch.float32}
    assert model.hive_levels.projectors[0].layers[0].weight.dtype != torch.float32  # the rest did move
    adapter = hive.get_hive_model(
        __import__("tiny_models").build_llava(), hive.HiveConfig(vision_layers=[1, 3], llm_layers=[0, 2])
    )
    assert gate_and_norm_dtypes(casts[cast](adapter)) == {torch.float32}


# ---------------------------------------------------------------------- 8. smaller
def test_hive_learning_rate_for_a_run_without_stage_2_or_3_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"--hive_learning_rate 0.5 applies to stages 2 and 3.*--stage 1"):
        train_main(["--data_format", "synthetic", "--output_dir", str(tmp_path), "--stage", "1",
                    "--hive_learning_rate", "0.5"])  # fmt: skip


def test_a_model_directory_that_does_not_exist_is_named_and_leaves_nothing(tmp_path):
    out = tmp_path / "run"
    done = hive_train_cli("--vision_model", "./no_such_dir", "--language_model", "./no_lm", "--data_format",
                          "synthetic", "--output_dir", out)  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert "--vision_model ./no_such_dir: no such directory" in done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists()


def test_fsdp_with_deepspeed_is_refused_before_the_data_is_read(tmp_path, monkeypatch):
    import hive_adapter.training.train as train

    def never(*args, **kwargs):
        raise AssertionError("the data was read before the contradiction was named")

    monkeypatch.setattr(train, "build_dataset", never)
    with pytest.raises(ValueError, match=r"--fsdp .* --deepspeed zero2: choose one"):
        train_main(["--data_format", "synthetic", "--output_dir", str(tmp_path / "run"), "--fsdp", "full_shard",
                    "--deepspeed", "zero2"])  # fmt: skip


def test_an_eval_forward_with_gradients_on_does_not_keep_its_graph():
    """model.eval() without torch.no_grad(): after the output is dropped, nothing the forward built (the
    tower's hidden states the projector's backward would need) stays alive through HIVE's runtime."""
    config = hive.HiveConfig(vision_layers=[1, 3], llm_layers=[0, 2])
    model = hive.HiveForConditionalGeneration.from_vision_text(build_vision("siglip"), build_text("llama"), config)
    model.eval()
    kept: list[weakref.ref] = []
    handle = model.vision_model.register_forward_hook(
        lambda module, args, output: kept.extend(weakref.ref(state) for state in output.hidden_states)
    )
    output = model(input_ids=text_ids(2, 6), **vision_inputs("siglip", 2))
    assert output.logits.requires_grad
    del output
    gc.collect()
    handle.remove()
    assert all(ref() is None for ref in kept), "the last prompt's autograd graph is still alive"
    # decoding from the kept context still works
    out = model(input_ids=text_ids(2, 6), **vision_inputs("siglip", 2), use_cache=True)
    step = model(input_ids=text_ids(2, 1, seed=5), past_key_values=out.past_key_values)
    assert step.logits.shape[:2] == (2, 1)
