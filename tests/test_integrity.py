"""No silent wrong results: what a hostile or careless user gets instead (issue: faults and bad input).

Each test is one case that used to give a wrong result without a word, or to destroy data.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tiny_models import IMAGE_TOKEN, build_llava, build_text, build_vision, set_gates, text_ids, vision_inputs
from transformers import AutoModel, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import hive_adapter as hive
from hive_adapter.data.collator import HiveCaptionCollator
from hive_adapter.data.datasets import read_records
from hive_adapter.data.synthetic import SyntheticShapes, caption_vocabulary
from hive_adapter.model.adapter_model import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
from hive_adapter.tools.export import export_vision_encoder
from hive_adapter.tools.toy_models import ToySizes, word_tokenizer, write_toy_models
from hive_adapter.training.checkpoints import CHECKPOINT_COMPLETE, choose_resume_checkpoint, mark_complete
from hive_adapter.training.train import main as train_main
from hive_adapter.utils.outputs import OWNER_FILE, OutputRefused

SMALL = ToySizes(image_size=32, patch_size=8, vision_width=32, vision_layers=4, text_width=64, text_layers=2)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
FAST = ["--global_batch_size", "8", "--per_device_train_batch_size", "8", "--hive_tokens_per_level", "4",
        "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "True", "--seed", "0"]  # fmt: skip


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_toy_models(tmp_path_factory.mktemp("toy"), caption_vocabulary(), sizes=SMALL)


@pytest.fixture(scope="module")
def stage1_run(toy, tmp_path_factory):
    """A finished stage 1 (composed stage 0 included) in its own output directory."""
    out = tmp_path_factory.mktemp("stage1-run")
    vision, language = toy
    train_main([*map(str, ["--vision_model", vision, "--language_model", language, "--data_format", "synthetic",
                           "--synthetic_size", 16, "--stage", "1", "--output_dir", out]), *FAST])  # fmt: skip
    return out


def hive_cli(module: str, *args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True, env=ENV, cwd=cwd, timeout=600
    )


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------- 1. never delete what we did not write
def test_export_never_deletes_a_directory_it_did_not_write(stage1_run, tmp_path):
    before = snapshot(stage1_run)
    result = hive_cli("hive_adapter.tools.export", stage1_run / "stage1", stage1_run)  # OUT holds the run itself
    assert result.returncode != 0 and "refused" in result.stderr and str(stage1_run) in result.stderr
    (tmp_path / "notes.txt").write_text("mine")
    result = hive_cli("hive_adapter.tools.export", stage1_run / "stage1", ".", cwd=tmp_path)  # OUT = the working dir
    assert result.returncode != 0 and "not empty" in result.stderr
    assert snapshot(stage1_run) == before and (tmp_path / "notes.txt").read_text() == "mine"


def test_export_replaces_only_its_own_earlier_export_and_only_when_asked(stage1_run, tmp_path):
    out = tmp_path / "encoder"
    export_vision_encoder(stage1_run / "stage1", out)
    assert (out / OWNER_FILE).is_file() and AutoModel.from_pretrained(out) is not None
    with pytest.raises(OutputRefused, match="--overwrite"):
        export_vision_encoder(stage1_run / "stage1", out)
    (out / "extra").write_text("a file of the earlier export")
    export_vision_encoder(stage1_run / "stage1", out, overwrite=True)
    assert not (out / "extra").exists()  # replaced whole
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(OutputRefused, match="is a file"):
        export_vision_encoder(stage1_run / "stage1", tmp_path / "a_file")
    foreign = tmp_path / "theirs"
    foreign.mkdir()
    (foreign / "model.safetensors").write_text("someone's model")
    with pytest.raises(OutputRefused, match="not written by hive-export-vision"):
        export_vision_encoder(stage1_run / "stage1", foreign, overwrite=True)
    assert (foreign / "model.safetensors").read_text() == "someone's model"


@pytest.mark.parametrize(
    "writer",
    [
        lambda d: write_toy_models(d, caption_vocabulary(), sizes=SMALL),
        lambda d: SyntheticShapes(4, image_size=32).write_image_folder(d),
        lambda d: SyntheticShapes(4, image_size=32).write_llava_json(d),
    ],
    ids=["toy-models", "image-folder", "llava-json"],
)
def test_directory_writers_refuse_a_folder_of_someone_else_and_replace_their_own(writer, tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "language").mkdir()
    (theirs / "language" / "model.safetensors").write_text("a real model")
    with pytest.raises(OutputRefused, match="not empty"):
        writer(theirs)
    assert (theirs / "language" / "model.safetensors").read_text() == "a real model"
    ours = tmp_path / "ours"
    writer(ours)
    writer(ours)  # a rerun replaces its own output
    assert (ours / OWNER_FILE).is_file() and not list(tmp_path.glob(".*partial"))


def test_hive_train_refuses_a_stage_directory_that_is_not_its_own(toy, tmp_path):
    (tmp_path / "stage1").mkdir()
    (tmp_path / "stage1" / "notes.txt").write_text("mine")
    vision, language = toy
    with pytest.raises(OutputRefused, match="stage1"):
        train_main([*map(str, ["--vision_model", vision, "--language_model", language, "--data_format", "synthetic",
                               "--synthetic_size", 8, "--stage", "1", "--output_dir", tmp_path]), *FAST])  # fmt: skip
    assert (tmp_path / "stage1" / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "stage0").exists()  # refused before composing anything


# ---------------------------------------------------------------------- 2. a stage starts from the previous one
def test_stage_2_starts_from_stage_1_of_the_same_run(stage1_run, capsys):
    train_main(["--data_format", "synthetic", "--synthetic_size", "16", "--stage", "2", "--output_dir",
                str(stage1_run), "--num_train_epochs", "1", *FAST])  # fmt: skip
    report = json.loads((stage1_run / "stage2" / "hive_stage.json").read_text())
    assert report["started_from"] == str(stage1_run / "stage1")
    stage1 = load_file(stage1_run / "stage1" / "model.safetensors")
    stage2 = load_file(stage1_run / "stage2" / "model.safetensors")
    stage0 = load_file(stage1_run / "stage0" / "model.safetensors")
    gate = "hive_blocks.0.hive_attn_gate"
    assert not torch.equal(stage1[gate], stage0[gate])  # stage 1 trained the gate ...
    assert not torch.equal(stage2[gate], stage0[gate])  # ... and stage 2 continued from it, not from stage 0


def test_a_later_stage_without_its_predecessor_is_refused(toy, tmp_path):
    with pytest.raises(ValueError, match=r"--stage 2 starts from stage 1's model.*stage1 is missing"):
        train_main(["--data_format", "synthetic", "--stage", "2", "--output_dir", str(tmp_path), *FAST])
    with pytest.raises(ValueError, match="--stage 3 starts from stage 2"):
        train_main(["--data_format", "synthetic", "--stage", "3", "--output_dir", str(tmp_path), *FAST])


def test_model_name_or_path_that_disagrees_with_a_finished_previous_stage_is_refused(stage1_run):
    with pytest.raises(ValueError, match="stage 1 is finished.*says to start from another model"):
        train_main(["--model_name_or_path", str(stage1_run / "stage0"), "--data_format", "synthetic", "--stage", "2",
                    "--output_dir", str(stage1_run), *FAST])  # fmt: skip


# ---------------------------------------------------------------------- 3. resume uses checkpoints complete now
def fake_checkpoint(folder: Path, step: int, *, mark: bool = True) -> Path:
    folder.mkdir(parents=True)
    for name in ("trainer_state.json", "model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (folder / name).write_text(f"{name} {step}")
    if mark:
        mark_complete(folder, step)
    return folder


def test_resume_takes_the_newest_checkpoint_complete_now_and_says_why_it_skipped_others(tmp_path):
    fake_checkpoint(tmp_path / "checkpoint-4", 4)
    fake_checkpoint(tmp_path / "checkpoint-8", 8)
    fake_checkpoint(tmp_path / "checkpoint-12", 12, mark=False)  # a save cut short
    (tmp_path / "checkpoint-8" / "optimizer.pt").unlink()  # half deleted by a rotation that was killed
    choice = choose_resume_checkpoint(tmp_path)
    assert choice.checkpoint == tmp_path / "checkpoint-4"
    message = choice.explain(tmp_path)
    assert "checkpoint-12: no completion marker" in message and "checkpoint-8: 1 of its files are gone" in message
    (tmp_path / "checkpoint-4" / "rng_state.pth").write_text("truncated")
    none = choose_resume_checkpoint(tmp_path)
    assert none.checkpoint is None and "changed size" in none.explain(tmp_path)
    assert "starting from the beginning" in none.explain(tmp_path)


def test_an_explicit_resume_path_that_is_incomplete_is_refused(toy, tmp_path):
    broken = fake_checkpoint(tmp_path / "ckpt" / "checkpoint-2", 2)
    (broken / CHECKPOINT_COMPLETE).unlink()
    vision, language = toy
    with pytest.raises(ValueError, match="--resume_from_checkpoint .*no completion marker"):
        train_main([*map(str, ["--vision_model", vision, "--language_model", language, "--data_format", "synthetic",
                               "--synthetic_size", 8, "--stage", "1", "--output_dir", tmp_path / "run",
                               "--resume_from_checkpoint", broken]), *FAST])  # fmt: skip


# ---------------------------------------------------------------------- 4. flags that contradict the model
def test_flags_that_contradict_the_starting_model_are_refused(stage1_run):
    with pytest.raises(ValueError) as error:
        train_main(["--model_name_or_path", str(stage1_run / "stage0"), "--vision_connector", "concat",
                    "--hive_tokens_per_level", "16", "--data_format", "synthetic", "--stage", "1",
                    "--output_dir", str(stage1_run / "elsewhere"), "--global_batch_size", "8",
                    "--per_device_train_batch_size", "8", "--report_to", "none"])  # fmt: skip
    message = str(error.value)
    assert "--vision_connector 'concat' (the model: connector='hive')" in message
    assert "--hive_tokens_per_level 16 (the model: tokens_per_level=4)" in message


def test_rerunning_a_finished_run_with_another_connector_is_refused(stage1_run):
    with pytest.raises(ValueError, match="--vision_connector 'cascaded'"):
        train_main(["--data_format", "synthetic", "--stage", "1", "--output_dir", str(stage1_run),
                    "--vision_connector", "cascaded", *FAST])  # fmt: skip


# ---------------------------------------------------------------------- 5. a run that cannot learn
def test_a_run_whose_captions_are_all_truncated_away_is_refused(toy, tmp_path):
    vision, language = toy
    with pytest.raises(ValueError, match=r"text budget is 4 tokens .*prompts take up to 5"):
        train_main([*map(str, ["--vision_model", vision, "--language_model", language, "--data_format", "synthetic",
                               "--synthetic_size", 8, "--stage", "1", "--output_dir", tmp_path,
                               "--max_text_length", 4]), *FAST])  # fmt: skip
    assert not (tmp_path / "stage1").exists()


def test_many_samples_without_labels_are_warned_about(toy, caplog):
    from hive_adapter.data.supervision import supervision_report

    tokenizer = word_tokenizer(caption_vocabulary())
    texts = [("describe the image .", "a red solid square")] * 7 + [("describe the image . " * 4, "a red")] * 3
    report = supervision_report(HiveCaptionCollator(tokenizer, None, max_length=12), texts)
    assert (report.samples, report.without_labels) == (10, 3)
    report.check()
    assert "3 of 10 samples (30%) lose every caption token" in caplog.text


def test_jsonl_with_a_null_caption_or_in_the_wrong_format_is_named(tmp_path):
    (tmp_path / "data.jsonl").write_text('{"image": "a.png", "text": "fine"}\n{"image": "b.png", "text": null}\n')
    with pytest.raises(ValueError, match=r"data.jsonl:2: 'text' is null, expected a string"):
        read_records(tmp_path / "data.jsonl")
    (tmp_path / "llava.json").write_text(json.dumps([{"image": "a.png", "conversations": []}]))
    with pytest.raises(ValueError, match=r"llava.json:1: .*use --data_format llava"):
        read_records(tmp_path / "llava.json", "jsonl")


# ---------------------------------------------------------------------- 6. one non-finite image
def nan_batch():
    """Sample 0: text, then its (NaN) image; sample 1: no image at all."""
    ids = text_ids(2, 10)
    ids[0, 5] = IMAGE_TOKEN
    pixels = vision_inputs("clip", 1)["pixel_values"]
    pixels[0, :, :4] = float("nan")
    return ids, pixels


@pytest.mark.parametrize("use_ffn", [False, True])
def test_a_nan_image_harms_only_the_text_after_its_marker(use_ffn, caplog):
    """In inference the bad image is left out, loudly: the text after its marker sees no image, and nothing
    else changes (before the fix, every row that may see no image was NaN x 0 = NaN, the other sample too)."""
    config = hive.HiveConfig(vision_layers=[1, 3], llm_layers=[0, 2], image_token_id=IMAGE_TOKEN, use_ffn=use_ffn)
    model = hive.HiveForConditionalGeneration.from_vision_text(build_vision("clip"), build_text("llama"), config)
    set_gates(model, 0.5)
    model.eval()
    ids, pixels = nan_batch()
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixels).logits
        text_only = build_text("llama").eval()(input_ids=ids).logits  # what no image changes
    torch.testing.assert_close(logits, text_only, rtol=0, atol=0)
    assert "image(s) [0] (of 1 in the batch) hold NaN or inf" in caplog.text and "left out" in caplog.text
    model.train()
    with pytest.raises(ValueError, match=r"image\(s\) \[0\] .*NaN or inf.*Training stops"):
        model(input_ids=ids, pixel_values=pixels, labels=ids)


def test_a_padding_slot_never_carries_another_samples_image():
    """Two images in sample 0 (the second one NaN-free), one in sample 1: sample 1's padding slot copies an image
    of sample 0 and is zeroed, so sample 1 computes exactly what it computes alone."""
    config = hive.HiveConfig(vision_layers=[1, 3], llm_layers=[0, 2], image_token_id=IMAGE_TOKEN)
    model = hive.HiveForConditionalGeneration.from_vision_text(build_vision("clip"), build_text("llama"), config)
    set_gates(model, 0.5)
    model.eval()
    ids = text_ids(2, 10)
    ids[0, 2], ids[0, 6], ids[1, 3] = IMAGE_TOKEN, IMAGE_TOKEN, IMAGE_TOKEN
    pixels = vision_inputs("clip", 3)["pixel_values"]
    with torch.no_grad():
        both = model(input_ids=ids, pixel_values=pixels).logits
        alone = model(input_ids=ids[1:], pixel_values=pixels[2:]).logits
    torch.testing.assert_close(both[1:], alone, rtol=1e-5, atol=1e-5)


def test_the_collator_names_the_sample_whose_pixels_are_not_finite(tmp_path):
    from transformers import SiglipImageProcessor

    processor = SiglipImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.0] * 3)
    collator = HiveCaptionCollator(word_tokenizer(caption_vocabulary()), processor)
    samples = [SyntheticShapes(2, image_size=32)[i] for i in range(2)]
    with pytest.raises(ValueError, match=r"synthetic sample 0 .*std of 0"):
        collator(samples)


# ---------------------------------------------------------------------- 8. an adapter on another base
def llava_with_layers(text_layers: int) -> LlavaForConditionalGeneration:
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                              image_size=32, patch_size=8)  # fmt: skip
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=text_layers, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=96)  # fmt: skip
    return LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_index=95))


def test_an_adapter_refuses_a_base_of_another_depth(tmp_path):
    config = hive.HiveConfig(vision_layers=[1, 3], llm_layers=[0, 2])
    hive.get_hive_model(llava_with_layers(4), config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="trained on a base with 4 language model layers, this base has 6"):
        hive.HiveModel.from_pretrained(llava_with_layers(6), tmp_path)


# ---------------------------------------------------------------------- 9. values that used to pass silently
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--global_batch_size", "0"], "--global_batch_size 0: must be a positive"),
        (["--global_batch_size", "-8"], "--global_batch_size -8"),
        (["--num_train_epochs", "0"], "--num_train_epochs 0.0: must be above 0"),
        (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size 0"),
        (["--learning_rate", "0"], "--learning_rate 0.0: must be a finite number above 0"),
        (["--max_steps", "0"], "--max_steps 0 trains nothing"),
        (["--save_total_limit", "0"], "--save_total_limit 0"),
    ],
)
def test_run_arguments_that_train_nothing_are_named(tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        train_main(["--data_format", "synthetic", "--output_dir", str(tmp_path), "--report_to", "none", *flags])


def test_hive_train_refuses_an_output_dir_that_is_a_file_and_jsonl_format_on_json(toy, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputRefused, match="is a file"):
        train_main(["--data_format", "synthetic", "--output_dir", str(tmp_path / "file")])
    SyntheticShapes(4, image_size=32).write_llava_json(tmp_path / "data")
    vision, language = toy
    with pytest.raises(ValueError, match="use --data_format llava"):
        train_main([*map(str, ["--vision_model", vision, "--language_model", language, "--data_path",
                               tmp_path / "data" / "synthetic.json", "--data_format", "jsonl", "--output_dir",
                               tmp_path / "run"]), *FAST])  # fmt: skip


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(vision_layer=[1, 3]), "unknown field 'vision_layer'; did you mean 'vision_layers'"),
        (dict(use_ffn="no"), "use_ffn='no': expected True or False"),
        (dict(gate_init=float("nan")), "gate_init=nan: expected a finite number"),
        (dict(initializer_range=-0.02), "initializer_range=-0.02"),
    ],
)
def test_config_values_that_used_to_pass_silently_are_named(settings, message):
    with pytest.raises(ValueError, match=message):
        hive.HiveConfig(**settings)


def test_an_empty_prompt_is_named():
    model = hive.HiveForConditionalGeneration.from_vision_text(
        build_vision("clip"), build_text("llama"), hive.HiveConfig(vision_layers=[1, 3], llm_layers=[0, 2])
    )
    with pytest.raises(ValueError, match="an empty prompt"):
        model(input_ids=torch.zeros(2, 0, dtype=torch.long), **vision_inputs("clip", 2))


@pytest.mark.parametrize("content", ["null", "[1, 2]", "{not json"])
def test_an_adapter_config_that_is_not_an_object_names_the_file(tmp_path, content):
    hive.get_hive_model(build_llava(), hive.HiveConfig(vision_layers=[1, 3], llm_layers=[0, 2])).save_pretrained(
        tmp_path
    )
    (tmp_path / ADAPTER_CONFIG_NAME).write_text(content)
    with pytest.raises(ValueError, match=str(tmp_path / ADAPTER_CONFIG_NAME)):
        hive.HiveModel.from_pretrained(build_llava(), tmp_path)


def test_save_pretrained_onto_a_file_is_refused_and_leaves_nothing(tmp_path):
    target = tmp_path / "model"
    target.write_text("not a directory")
    adapter = hive.get_hive_model(build_llava(), hive.HiveConfig(vision_layers=[1, 3], llm_layers=[0, 2]))
    with pytest.raises(ValueError, match="that is a file"):
        adapter.save_pretrained(target)
    full = hive.HiveForConditionalGeneration.from_vision_text(
        build_vision("clip"), build_text("llama"), hive.HiveConfig(vision_layers=[1, 3], llm_layers=[0, 2])
    )
    with pytest.raises(ValueError, match="that is a file"):
        full.save_pretrained(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"] and target.read_text() == "not a directory"


# ---------------------------------------------------------------------- 10. damaged weights
def poison(path: Path, key: str) -> None:
    """Overwrite one tensor's bytes in a safetensors file with 0xFF (float32 NaN)."""
    data = bytearray(path.read_bytes())
    header_length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + header_length])
    start, end = header[key]["data_offsets"]
    data[8 + header_length + start : 8 + header_length + end] = b"\xff" * (end - start)
    path.write_bytes(bytes(data))


def test_weights_with_flipped_bytes_are_refused_by_name(tmp_path):
    full = hive.HiveForConditionalGeneration.from_vision_text(
        build_vision("clip"), build_text("llama"), hive.HiveConfig(vision_layers=[1, 3], llm_layers=[0, 2])
    )
    full.save_pretrained(tmp_path / "full")
    poison(tmp_path / "full" / "model.safetensors", "hive_blocks.2.attn.hive_q_proj.weight")
    with pytest.raises(ValueError, match=r"hold NaN or inf: hive_blocks\.2\.attn\.hive_q_proj\.weight"):
        hive.HiveForConditionalGeneration.from_pretrained(tmp_path / "full")
    adapter = hive.get_hive_model(build_llava(), hive.HiveConfig(vision_layers=[1, 3], llm_layers=[0, 2]))
    adapter.save_pretrained(tmp_path / "adapter")
    poison(tmp_path / "adapter" / ADAPTER_WEIGHTS_NAME, "hive_levels.projectors.1.layers.0.weight")
    with pytest.raises(ValueError, match=r"hive_levels\.projectors\.1\.layers\.0\.weight"):
        hive.HiveModel.from_pretrained(build_llava(), tmp_path / "adapter")


def test_a_bad_image_file_is_still_named(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    Image.new("RGB", (8, 8)).save(tmp_path / "good.png")
    (tmp_path / "data.jsonl").write_text(
        '{"image": "good.png", "text": "a red square"}\n{"image": "bad.png", "text": "a red square"}\n'
    )
    from hive_adapter.data.datasets import BadImageError, ImageCaptionDataset

    dataset = ImageCaptionDataset(read_records(tmp_path / "data.jsonl"), tmp_path)
    assert dataset[0]["source"].endswith("good.png")
    with pytest.raises(BadImageError, match="bad.png"):
        dataset[1]


def test_layer_flags_are_compared_as_the_models_connector_places_them_even_under_another_connector():
    """Before, a different --vision_connector skipped the layer check; now the asked layers are resolved by the
    model's connector, so a contradicting --hive_llm_layers is named beside the connector."""
    from transformers import LlamaConfig, SiglipVisionConfig

    from hive_adapter.training.hive_flags import HiveArguments
    from hive_adapter.training.plan import contradictions

    config = hive.HiveConfig(
        vision_layers=[1, 3], llm_layers=[0, 1], vision_config=SiglipVisionConfig(num_hidden_layers=4),
        text_config=LlamaConfig(num_hidden_layers=4),
    )  # fmt: skip
    asked = HiveArguments(vision_connector="cascaded", hive_vision_layers="1,3", hive_llm_layers="2,3")
    found = contradictions(config, asked, {"vision_connector", "hive_vision_layers", "hive_llm_layers"})
    assert "--vision_connector 'cascaded' (the model: connector='hive')" in found
    assert "--hive_llm_layers [2, 3] (the model: [0, 1])" in found
    same = HiveArguments(vision_connector="hive", hive_vision_layers="1,3", hive_llm_layers="0,1")
    assert contradictions(config, same, {"vision_connector", "hive_vision_layers", "hive_llm_layers"}) == []


def test_the_initializer_range_flag_reaches_the_config_and_a_contradicting_one_is_named():
    """`--hive_initializer_range` sets the std of HIVE's new weights (the instruct benchmark's init study); left
    out, HiveConfig's default stays; given against a model built with another, it is named."""
    from hive_adapter.training.hive_flags import HiveArguments, hive_config_from
    from hive_adapter.training.plan import contradictions

    assert hive_config_from(HiveArguments()).initializer_range == hive.HiveConfig().initializer_range
    asked = HiveArguments(hive_initializer_range=0.1)
    assert hive_config_from(asked).initializer_range == 0.1
    found = contradictions(hive.HiveConfig(), asked, {"hive_initializer_range"})
    assert found == ["--hive_initializer_range 0.1 (the model: initializer_range=None)"]  # None: 1/sqrt(fan_in)
    with pytest.raises(ValueError, match="initializer_range"):
        hive_config_from(HiveArguments(hive_initializer_range=-1.0))
