"""hive-train: stages as data, argument scaling, data loading, a real three-stage run, resume, export."""

import json
import os
import subprocess
import sys

import pytest
import torch
from killed_runs import KILL_DRIVER
from PIL import Image
from transformers import AutoModel, AutoProcessor, TrainingArguments, pipeline

import hive_adapter as hive
from hive_adapter.data.collator import HiveCaptionCollator
from hive_adapter.data.datasets import BadImageError, ImageCaptionDataset, read_records
from hive_adapter.data.synthetic import SyntheticShapes, caption_vocabulary
from hive_adapter.tools.toy_models import ToySizes, word_tokenizer, write_toy_models
from hive_adapter.training.checkpoints import CHECKPOINT_COMPLETE, choose_resume_checkpoint
from hive_adapter.training.stage_run import stage_arguments
from hive_adapter.training.stages import STAGES, apply_stage, parse_stages

SMALL = ToySizes(image_size=32, patch_size=8, vision_width=32, vision_layers=4, text_width=64, text_layers=2)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_toy_models(tmp_path_factory.mktemp("toy"), caption_vocabulary(), sizes=SMALL)


def hive_train(*args, check=True):
    result = subprocess.run(
        [sys.executable, "-m", "hive_adapter.training.train", *map(str, args)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=900,
    )
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def test_stage_table_is_table_3():
    assert [STAGES[n].peak_lr for n in (1, 2, 3)] == [1e-3, 2e-5, 2e-6]
    assert [STAGES[n].min_lr for n in (1, 2, 3)] == [1e-4, 2e-6, 0.0]
    assert [STAGES[n].betas for n in (1, 2, 3)] == [(0.9, 0.999), (0.9, 0.95), (0.9, 0.95)]
    assert [STAGES[n].global_batch_size for n in (1, 2, 3)] == [256, 256, 1024]
    assert [STAGES[n].epochs for n in (1, 2, 3)] == [1, 2, 1]
    assert [STAGES[n].max_grad_norm for n in (1, 2, 3)] == [1.0, 10.0, 10.0]
    assert [STAGES[n].paper_warmup_iters for n in (1, 2, 3)] == [70, 140, 18]
    assert all(STAGES[n].weight_decay == 0 for n in (1, 2, 3))
    assert [s.number for s in parse_stages("all")] == [1, 2, 3] and [s.number for s in parse_stages("2,3")] == [2, 3]
    for bad in ("5", "3,2", "x", "", "sft,1"):
        with pytest.raises(ValueError, match="--stage"):
            parse_stages(bad)


def test_stage_arguments_scale_to_the_run_and_explicit_flags_win(tmp_path):
    base = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, use_cpu=True, report_to="none")
    args = stage_arguments(
        base, STAGES[2], num_samples=10_000, global_batch_size=None, explicit=set(), output_dir=tmp_path, deepspeed=None
    )
    assert args.gradient_accumulation_steps == 32  # 256 = 8 x 32 x 1 rank
    total = 2 * -(-10_000 // 256)
    assert args.warmup_steps == -(-140 * total // 4652)  # the paper's warmup share of this run
    assert (args.learning_rate, args.adam_beta2, args.max_grad_norm, args.num_train_epochs) == (2e-5, 0.95, 10.0, 2)
    assert args.lr_scheduler_kwargs == {"min_lr_rate": pytest.approx(0.1)}
    base = TrainingArguments(output_dir=str(tmp_path), learning_rate=5e-4, use_cpu=True, report_to="none")
    args = stage_arguments(
        base,
        STAGES[1],
        num_samples=100,
        global_batch_size=16,
        explicit={"learning_rate"},
        output_dir=tmp_path,
        deepspeed=None,
    )
    assert args.learning_rate == 5e-4 and args.gradient_accumulation_steps == 2
    assert args.lr_scheduler_kwargs == {"min_lr_rate": pytest.approx(1e-4 / 5e-4)}
    with pytest.raises(ValueError, match="global batch 20 is not a multiple"):
        stage_arguments(
            base, STAGES[1], num_samples=100, global_batch_size=20, explicit=set(), output_dir=tmp_path, deepspeed=None
        )


def test_apply_stage_trains_the_right_parts():
    from tiny_models import build_text, build_vision

    model = hive.HiveForConditionalGeneration.from_vision_text(
        build_vision("clip"), build_text("llama"), hive.HiveConfig()
    )
    for number, parts in ((1, {"hive"}), (2, {"hive", "llm"}), (3, {"hive", "llm", "vision"})):
        counts = apply_stage(model, STAGES[number])
        assert {part for part, (trainable, _) in counts.items() if trainable} == parts
        for name, param in model.named_parameters():
            part = "hive" if "hive_" in name else "vision" if name.startswith("vision_model.") else "llm"
            assert param.requires_grad == (part in parts), name


def test_synthetic_set_is_deterministic_and_captions_follow_the_picture():
    a, b = SyntheticShapes(20, seed=3, image_size=32), SyntheticShapes(20, seed=3, image_size=32)
    assert [a[i]["caption"] for i in range(20)] == [b[i]["caption"] for i in range(20)]
    assert list(a.image(5).getdata()) == list(b.image(5).getdata())
    assert [a[i]["caption"] for i in range(20)] != [SyntheticShapes(20, seed=4)[i]["caption"] for i in range(20)]
    sample = a.sample(0)
    image = a.image(0)
    assert image.size == (32, 32)
    assert sample.caption.startswith(f"a {sample.colour} {sample.texture} {sample.shape} in the ")
    easier = SyntheticShapes(20, seed=3, image_size=32, attributes=("position", "colour"))
    assert easier[0]["caption"] == f"a {sample.colour} in the {sample.position}"  # caption order, not argument order
    assert list(easier.image(5).getdata()) == list(a.image(5).getdata())  # the same pictures


def test_llava_json_and_jsonl_load_and_bad_images_are_named(tmp_path):
    SyntheticShapes(4, image_size=32).write_llava_json(tmp_path)
    records = read_records(tmp_path / "synthetic.json")
    assert len(records) == 4 and "<image>" not in records[0].prompt and records[0].caption.startswith("a ")
    (tmp_path / "data.jsonl").write_text(
        "\n".join(json.dumps({"image": f"images/{r.image}", "text": r.caption}) for r in records)
    )
    assert [r.caption for r in read_records(tmp_path / "data.jsonl")] == [r.caption for r in records]

    (tmp_path / "images" / records[1].image).write_bytes(b"not a png")
    strict = ImageCaptionDataset(records, tmp_path / "images")
    with pytest.raises(BadImageError, match=f"cannot read image .*{records[1].image}.*--skip_bad_images"):
        strict[1]
    lenient = ImageCaptionDataset(records, tmp_path / "images", skip_bad_images=True)
    assert lenient[1]["caption"] == records[2].caption and lenient.skipped == 1  # next readable sample, counted
    with pytest.raises(ValueError, match="entry 0 has no 'image'"):
        (tmp_path / "bad.json").write_text(json.dumps([{"id": 1}]))
        read_records(tmp_path / "bad.json")


def test_collator_truncates_at_77_and_learns_only_the_caption(toy):
    from transformers import AutoImageProcessor, AutoTokenizer

    vision_dir, language_dir = toy
    collator = HiveCaptionCollator(
        AutoTokenizer.from_pretrained(language_dir), AutoImageProcessor.from_pretrained(vision_dir)
    )
    long_caption = " ".join(["red"] * 200)
    batch = collator([
        {"image": Image.new("RGB", (40, 40)), "prompt": "describe the image .", "caption": "a red square"},
        {"image": Image.new("RGB", (40, 40)), "prompt": "", "caption": long_caption},
    ])  # fmt: skip
    assert batch["input_ids"].shape[1] == 77 and batch["pixel_values"].shape == (2, 3, 32, 32)
    tokenizer = collator.tokenizer
    first = batch["input_ids"][0][batch["attention_mask"][0].bool()]
    learned = batch["labels"][0][batch["labels"][0] != -100]
    assert tokenizer.decode(learned) == "a red square <eos>"
    assert tokenizer.decode(first[:5]) == "<bos> describe the image ."


def test_three_stages_train_save_and_reload(toy, tmp_path):
    vision_dir, language_dir = toy
    out = tmp_path / "run"
    result = hive_train(
        "--vision_model", vision_dir, "--language_model", language_dir, "--data_format", "synthetic",
        "--synthetic_size", 96, "--stage", "all", "--output_dir", out, "--global_batch_size", 16,
        "--per_device_train_batch_size", 16, "--hive_tokens_per_level", 4, "--report_to", "none",
        "--save_strategy", "no",
    )  # fmt: skip
    assert "stage 3: loss" in result.stdout
    # not on a terminal (captured): a line per logging step, no redrawn bars, no notice a user can do nothing about
    console = result.stdout + result.stderr
    assert "\r" not in console and "it/s]" not in console, console[-2000:]
    assert "[hive-train] stage 2 step 12/12 loss" in result.stdout and "{'loss'" not in console, result.stdout
    assert "Setting accelerator to CPU" not in console and "falling back to" not in console, console[-2000:]
    assert " INFO " not in console, console[-2000:]  # library logs at INFO only with --log_level info
    expected_parts = {1: {"hive"}, 2: {"hive", "llm"}, 3: {"hive", "llm", "vision"}}
    for stage in (1, 2, 3):
        report = json.loads((out / f"stage{stage}" / "hive_stage.json").read_text())
        trained = {part for part, c in report["trainable_parameters"].items() if c["trainable"]}
        assert trained == expected_parts[stage]
        assert report["global_steps"] == (12 if stage == 2 else 6) and report["losses"]
    first = json.loads((out / "stage1" / "hive_stage.json").read_text())["losses"][0]
    last = json.loads((out / "stage3" / "hive_stage.json").read_text())["losses"][-1]
    assert last < first
    model = AutoModel.from_pretrained(out / "stage3")
    assert isinstance(model, hive.HiveForConditionalGeneration)
    # every stage directory is usable as any HF VLM: its processor (chat template included) and the pipeline
    for stage in (0, 1, 2, 3):
        assert (out / f"stage{stage}" / "processor_config.json").is_file(), stage
        assert (out / f"stage{stage}" / "chat_template.jinja").is_file(), stage
    processor = AutoProcessor.from_pretrained(out / "stage3")
    assert isinstance(processor, hive.HiveProcessor) and processor.image_token is None  # captioning mode
    chat = [{"role": "user", "content": [{"type": "image", "image": SyntheticShapes(1, image_size=32).image(0)},
                                         {"type": "text", "text": "describe the image ."}]}]  # fmt: skip
    answer = pipeline("image-text-to-text", model=str(out / "stage3"))(text=chat, max_new_tokens=3)
    assert isinstance(answer[0]["generated_text"][-1]["content"], str)
    stage1 = AutoModel.from_pretrained(out / "stage1")
    stage0 = AutoModel.from_pretrained(out / "stage0")
    for (name, p1), (_, p0) in zip(stage1.named_parameters(), stage0.named_parameters(), strict=True):
        assert torch.equal(p1, p0) == ("hive_" not in name), name  # stage 1 moved exactly the HIVE weights
    rerun = hive_train(
        "--model_name_or_path",
        out / "stage0",
        "--data_format",
        "synthetic",
        "--synthetic_size",
        96,
        "--stage",
        "all",
        "--output_dir",
        out,
        "--report_to",
        "none",
    )
    assert "stage 1 already finished" in rerun.stdout and "stage 3 already finished" in rerun.stdout

    exported = tmp_path / "encoder"
    subprocess.run([sys.executable, "-m", "hive_adapter.tools.export", out / "stage3", exported], check=True, env=ENV)
    encoder = AutoModel.from_pretrained(exported)
    assert type(encoder).__name__ == "SiglipVisionModel" and (exported / "preprocessor_config.json").is_file()
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            encoder(pixel_values=pixels).last_hidden_state, model.vision_model(pixel_values=pixels).last_hidden_state
        )


def test_a_killed_run_resumes_on_the_same_loss_curve(toy, tmp_path):
    vision_dir, language_dir = toy
    common = ["--vision_model", vision_dir, "--language_model", language_dir, "--data_format", "synthetic",
              "--synthetic_size", 64, "--stage", "1", "--global_batch_size", 4, "--per_device_train_batch_size", 4,
              "--num_train_epochs", 1, "--logging_steps", 1, "--save_strategy", "steps", "--save_steps", 4,
              "--hive_tokens_per_level", 4, "--report_to", "none", "--seed", 0]  # fmt: skip
    hive_train(*common, "--output_dir", tmp_path / "straight")
    straight = json.loads((tmp_path / "straight" / "stage1" / "hive_stage.json").read_text())["losses"]
    assert len(straight) == 16

    killed_dir = tmp_path / "killed"
    driver = tmp_path / "driver.py"
    driver.write_text(KILL_DRIVER.format(kill_at=8))
    crashed = subprocess.run(
        [sys.executable, driver, *map(str, common), "--output_dir", killed_dir],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=900,
    )
    assert crashed.returncode == 9, crashed.stderr[-3000:]
    checkpoints = killed_dir / "stage1-checkpoints"
    assert not (killed_dir / "stage1").exists()  # an unfinished stage never looks finished
    torn = checkpoints / "checkpoint-12"  # a save cut short: files but no completion marker
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"truncated")
    assert choose_resume_checkpoint(checkpoints).checkpoint == checkpoints / "checkpoint-8"
    assert (checkpoints / "checkpoint-8" / CHECKPOINT_COMPLETE).is_file()

    resumed = hive_train(*common, "--output_dir", killed_dir, "--resume_from_checkpoint", "auto")
    assert "resuming from" in resumed.stdout and "checkpoint-8" in resumed.stdout
    report = json.loads((killed_dir / "stage1" / "hive_stage.json").read_text())
    steps = {entry["step"]: entry["loss"] for entry in report["log_history"] if "loss" in entry}
    assert sorted(steps) == list(range(1, 17))  # 1-8 restored from the checkpoint, 9-16 trained after resuming
    for step, loss in steps.items():
        assert loss == pytest.approx(straight[step - 1], abs=1e-5), step


def test_bad_arguments_are_named(toy, tmp_path):
    result = hive_train(
        "--data_format", "synthetic", "--output_dir", tmp_path, "--vision_connector", "perceiver", check=False
    )
    assert result.returncode != 0 and "connector='perceiver'" in result.stderr
    result = hive_train("--data_format", "synthetic", "--output_dir", tmp_path, "--deepspeed", "zero9", check=False)
    assert result.returncode != 0 and "--deepspeed 'zero9'" in result.stderr and "zero3_offload" in result.stderr
    result = hive_train("--output_dir", tmp_path, "--data_format", "synthetic", check=False)
    assert result.returncode != 0 and "pass --vision_model and --language_model" in result.stderr
    result = hive_train("--output_dir", tmp_path, "--hive_learning_rate", "0", check=False)
    assert result.returncode != 0 and "--hive_learning_rate 0.0: must be a finite number above 0" in result.stderr
    result = hive_train("--output_dir", tmp_path, "--synthetic_attributes", "colour,smell", check=False)
    assert result.returncode != 0 and "attributes=('colour', 'smell')" in result.stderr


def mean_change(before: dict, after: dict, hive: bool) -> float:
    """Mean absolute change of the HIVE (or the language model's) weights between two state dicts."""
    names = [n for n in before if ("hive_" in n) == hive and (hive or n.startswith("language_model."))]
    return sum(float((after[n] - before[n]).abs().sum()) for n in names) / sum(before[n].numel() for n in names)


def test_hive_learning_rate_moves_hive_modules_at_their_own_rate_in_stage_2_only(toy, tmp_path):
    from safetensors.torch import load_file

    vision_dir, language_dir = toy
    common = ["--data_format", "synthetic", "--synthetic_size", 64, "--stage", "1,2", "--max_steps", 4,
              "--global_batch_size", 16, "--per_device_train_batch_size", 16, "--hive_tokens_per_level", 4,
              "--report_to", "none", "--save_strategy", "no"]  # fmt: skip
    hive_train("--vision_model", vision_dir, "--language_model", language_dir, *common, "--output_dir", tmp_path / "a")
    faster = hive_train(
        "--model_name_or_path", tmp_path / "a" / "stage0", *common, "--output_dir", tmp_path / "b",
        "--hive_learning_rate", 1e-3,
    )  # fmt: skip
    assert "HIVE modules at lr 0.001" in faster.stdout
    reports = {run: json.loads((tmp_path / run / "stage2" / "hive_stage.json").read_text()) for run in "ab"}
    assert reports["a"]["hive_learning_rate"] is None and reports["b"]["hive_learning_rate"] == 1e-3
    assert json.loads((tmp_path / "b" / "stage1" / "hive_stage.json").read_text())["hive_learning_rate"] is None
    weights = {
        (run, stage): load_file(tmp_path / run / f"stage{stage}" / "model.safetensors")
        for run in "ab"
        for stage in (1, 2)
    }
    torch.testing.assert_close(weights["a", 1], weights["b", 1])  # stage 1: the flag does not apply
    hive_moved = {run: mean_change(weights[run, 1], weights[run, 2], hive=True) for run in "ab"}
    llm_moved = {run: mean_change(weights[run, 1], weights[run, 2], hive=False) for run in "ab"}
    assert hive_moved["b"] > 10 * hive_moved["a"], hive_moved  # Adam's step scales with the rate: 1e-3 vs 2e-5
    assert llm_moved["b"] == pytest.approx(llm_moved["a"], rel=0.5), llm_moved  # the LLM keeps Table 3's rate


def encoder_change(before: dict, after: dict) -> float:
    """Mean absolute change of the vision encoder's weights between two state dicts."""
    names = [n for n in before if n.startswith("vision_model.")]
    return sum(float((after[n] - before[n]).abs().sum()) for n in names) / sum(before[n].numel() for n in names)


def test_vision_learning_rate_moves_the_encoder_at_its_own_rate_in_stage_3(toy, tmp_path):
    from safetensors.torch import load_file

    vision_dir, language_dir = toy
    common = ["--data_format", "synthetic", "--synthetic_size", 64, "--max_steps", 3, "--global_batch_size", 16,
              "--per_device_train_batch_size", 16, "--hive_tokens_per_level", 4, "--report_to", "none",
              "--save_strategy", "no"]  # fmt: skip
    hive_train("--vision_model", vision_dir, "--language_model", language_dir, *common, "--stage", "all",
               "--output_dir", tmp_path / "a")  # fmt: skip
    faster = hive_train("--model_name_or_path", tmp_path / "a" / "stage2", *common, "--stage", "3",
                        "--output_dir", tmp_path / "b", "--vision_learning_rate", 1e-3)  # fmt: skip
    assert "vision encoder at lr 0.001" in faster.stdout
    reports = {run: json.loads((tmp_path / run / "stage3" / "hive_stage.json").read_text()) for run in "ab"}
    assert reports["a"]["vision_learning_rate"] is None and reports["b"]["vision_learning_rate"] == 1e-3
    start = load_file(tmp_path / "a" / "stage2" / "model.safetensors")
    ends = {run: load_file(tmp_path / run / "stage3" / "model.safetensors") for run in "ab"}
    moved = {run: encoder_change(start, ends[run]) for run in "ab"}
    assert moved["b"] > 10 * moved["a"] > 0, moved  # Adam's step scales with the rate: 1e-3 vs Table 3's stage 3
    llm_moved = {run: mean_change(start, ends[run], hive=False) for run in "ab"}
    assert llm_moved["b"] == pytest.approx(llm_moved["a"], rel=0.5), llm_moved  # the LLM keeps the stage's rate


def test_vision_learning_rate_is_refused_where_the_encoder_does_not_train(tmp_path):
    result = hive_train("--output_dir", tmp_path, "--vision_learning_rate", "nan", check=False)
    assert result.returncode != 0 and "--vision_learning_rate nan: must be a finite number above 0" in result.stderr
    result = hive_train("--output_dir", tmp_path, "--stage", "1,2", "--vision_learning_rate", "1e-4", check=False)
    assert result.returncode != 0 and "--vision_learning_rate 0.0001 applies to stage 3" in result.stderr


def test_help_is_readable():
    result = hive_train("--help")
    for flag in ("--vision_connector", "--stage", "--hive_vision_layers", "--global_batch_size", "--skip_bad_images",
                 "--hive_learning_rate", "--synthetic_attributes"):  # fmt: skip
        assert flag in result.stdout
    assert "default: 77 for" in result.stdout and "2048 for --stage sft" in result.stdout


def test_word_tokenizer_round_trips():
    tokenizer = word_tokenizer(caption_vocabulary())
    ids = tokenizer("a red striped circle in the top left", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == "a red striped circle in the top left"
    assert tokenizer.unk_token_id not in ids


def test_a_tokenizer_without_a_pad_token_pads_with_unk_then_eos():
    from hive_adapter.data.collator import with_pad_token

    tokenizer = word_tokenizer(caption_vocabulary())
    tokenizer.pad_token = None
    assert with_pad_token(tokenizer).pad_token == "<unk>"  # as LLaVA pads Vicuna
    tokenizer.pad_token = tokenizer.unk_token = None
    assert with_pad_token(tokenizer).pad_token == "<eos>"
    tokenizer.pad_token = tokenizer.eos_token = None
    with pytest.raises(ValueError, match="no pad, unk or eos token"):
        with_pad_token(tokenizer)


def test_a_launched_rank_ends_with_its_exit_handlers_run_and_its_output_flushed(tmp_path):
    """`exit_rank` (the end of every launched hive-train / LLaVA rank) skips interpreter finalization but
    loses nothing on the way: buffered output, the log file's last record and atexit handlers all land."""
    script = """
import atexit, logging, sys
from hive_adapter.utils.distributed import exit_rank
logging.basicConfig(filename=sys.argv[1], level=logging.INFO)
atexit.register(lambda: print("exit handler ran"))
logging.getLogger("rank").info("last record")
print("buffered, no newline", end="")
exit_rank(3)
print("never printed")
"""
    log = tmp_path / "rank.log"
    result = subprocess.run([sys.executable, "-c", script, str(log)], capture_output=True, text=True, env=ENV)
    assert result.returncode == 3, result.stderr
    assert result.stdout == "buffered, no newlineexit handler ran\n"
    assert "last record" in log.read_text()
