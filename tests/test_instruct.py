"""Visual instruction tuning in hive-train: LLaVA's conversations, assistant-only labels, truncation that never
detaches an image, and `--stage sft` end to end."""

import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from hive_checkpoints import VISION_LAYERS
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoProcessor, AutoTokenizer, pipeline

import hive_adapter as hive
from hive_adapter.data.conversations import (
    ConversationDataset,
    HiveConversationCollator,
    SyntheticConversations,
    drop_cut_images,
    read_llava_instruct,
)
from hive_adapter.model.loading import load_vision_encoder
from hive_adapter.training.stages import SFT, parse_stages

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def picture(colour):
    return Image.new("RGB", (32, 32), colour)


@pytest.fixture
def llava_file(tmp_path):
    """LLaVA's instruction layout: two rounds with a marker, a text-only entry, two images, an image without a
    marker (LLaVA puts it in front of the first human turn)."""
    for name, colour in (("a.png", "red"), ("b.png", "blue")):
        picture(colour).save(tmp_path / name)
    entries = [
        {"id": "two-rounds", "image": "a.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat colour is it ?"}, {"from": "gpt", "value": "red"},
            {"from": "human", "value": "what shape is it ?"}, {"from": "gpt", "value": "a square"}]},
        {"id": "text-only", "conversations": [
            {"from": "human", "value": "repeat : blue"}, {"from": "gpt", "value": "blue"}]},
        {"id": "two-images", "image": ["a.png", "b.png"], "conversations": [
            {"from": "human", "value": "<image> <image> what colour is the second one ?"},
            {"from": "gpt", "value": "blue"}]},
        {"id": "no-marker", "image": "b.png", "conversations": [
            {"from": "human", "value": "what colour is it ?"}, {"from": "gpt", "value": "blue"}]},
    ]  # fmt: skip
    path = tmp_path / "instruct.json"
    path.write_text(json.dumps(entries))
    return path


def test_llava_conversations_keep_every_turn_text_only_entries_and_several_images(llava_file):
    records = {record.id: record for record in read_llava_instruct(llava_file)}
    assert len(records["two-rounds"].turns) == 4 and records["text-only"].images == ()
    messages = records["two-images"].messages()
    assert [part["type"] for part in messages[0]["content"]] == ["image", "image", "text"]
    assert [part["image"] for part in messages[0]["content"][:2]] == ["a.png", "b.png"]
    unmarked = records["no-marker"].messages()
    assert unmarked[0]["content"][0] == {"type": "image", "image": "b.png"}  # in front (LLaVA would leave it unseen)


def test_bad_instruction_entries_are_named(tmp_path):
    def refused(entries, match):
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(entries))
        with pytest.raises(ValueError, match=match):
            read_llava_instruct(path)

    turn = {"from": "gpt", "value": "red"}
    refused([{"id": "x", "image": "a.png", "conversations": [{"from": "human", "value": "<image> <image> hi"}, turn]}],
            r"entry 0 \(x\): 2 <image> markers for 1 images")  # fmt: skip
    refused([{"id": "y", "conversations": [{"from": "human", "value": "hi"}]}], r"entry 0 \(y\): has no 'gpt' turn")
    refused([{"id": "z", "conversations": [{"from": "robot", "value": "hi"}, turn]}], r"entry 0 \(z\): a turn")
    refused({"not": "a list"}, "expected LLaVA's list")


def test_labels_are_every_assistant_turn_and_nothing_else(llava_file, instruction_processor):
    dataset = ConversationDataset(read_llava_instruct(llava_file), llava_file.parent)
    batch = HiveConversationCollator(instruction_processor, max_length=64)([dataset[0], dataset[1], dataset[2]])
    tokens = instruction_processor.tokenizer.convert_ids_to_tokens
    learned = [tokens(row[row >= 0]) for row in batch["labels"]]
    assert learned == [["red", "<eos>", "a", "square", "<eos>"], ["blue", "<eos>"], ["blue", "<eos>"]]
    first = tokens(batch["input_ids"][0][batch["attention_mask"][0].bool()])
    assert first == ["<bos>", "USER:", "<image>", "what", "colour", "is", "it", "?", "ASSISTANT:", "red", "<eos>",
                     "USER:", "what", "shape", "is", "it", "?", "ASSISTANT:", "a", "square", "<eos>"]  # fmt: skip
    assert batch["pixel_values"].shape[0] == 3  # one + none + two, in marker order
    marker = instruction_processor.image_token_id
    assert (batch["input_ids"] == marker).sum(dim=1).tolist() == [1, 0, 2]


def test_truncation_drops_a_conversation_that_would_lose_its_image_and_never_moves_an_image(
    llava_file, instruction_processor, caplog
):
    from hive_adapter.data.conversations import ConversationRecord

    late = ConversationRecord(
        "late", ("a.png",), (("user", "repeat : red red red red red red red red <image>"), ("assistant", "red"))
    )
    short = ConversationRecord("short", ("b.png",), (("user", "<image> what colour is it ?"), ("assistant", "blue")))
    dataset = ConversationDataset(
        [late, short], llava_file.parent
    )  # late's marker is token 12, short's token 2; short's answer starts at token 9
    with caplog.at_level(logging.WARNING):
        kept = drop_cut_images(dataset, instruction_processor, max_length=10)
    assert [record.id for record in kept.records] == ["short"] and kept.dropped == ["late"]
    assert "1 of 2 conversations dropped at --max_text_length 10: an image marker lies beyond it" in caplog.text
    assert "entry late" in caplog.text
    # past the filter, a cut marker in a batch is refused, never an image given to the next sample's text
    with pytest.raises(ValueError, match=r"entry late: 1 images but 0 markers left after truncation at 10"):
        HiveConversationCollator(instruction_processor, max_length=10)([dataset[0], dataset[1]])
    with pytest.raises(ValueError, match=r"no conversation fits --max_text_length 2"):
        drop_cut_images(dataset, instruction_processor, max_length=2)


def test_the_sft_stage_is_llava_1_5_finetuning_and_runs_alone():
    (stage,) = parse_stages("sft")
    assert stage is SFT and stage.trains == ("hive", "llm") and stage.peak_lr == 2e-5
    assert stage.global_batch_size == 128 and stage.epochs == 1 and abs(stage.warmup_ratio - 0.03) < 1e-9
    with pytest.raises(ValueError, match="sft trains on instruction data"):
        parse_stages("3,sft")


def hive_train(*args):
    return subprocess.run([sys.executable, "-m", "hive_adapter.training.train", *map(str, args)], capture_output=True,
                          text=True, env=ENV, timeout=900)  # fmt: skip


@pytest.fixture(scope="module")
def pretrained(instruction_toy, tmp_path_factory):
    """A saved captioning-mode HIVE model with its processor, as stage 3 leaves one."""
    directory = tmp_path_factory.mktemp("stage3")
    torch.manual_seed(0)
    model = hive.HiveForConditionalGeneration.from_vision_text(
        load_vision_encoder(instruction_toy[0]),
        AutoModelForCausalLM.from_pretrained(instruction_toy[1]),
        hive.HiveConfig(vision_layers=VISION_LAYERS, llm_layers=[0, 1], tokens_per_level=4),
    )
    model.save_pretrained(directory)
    hive.HiveProcessor.for_model(
        model,
        tokenizer=AutoTokenizer.from_pretrained(instruction_toy[1]),
        image_processor=AutoImageProcessor.from_pretrained(instruction_toy[0]),
    ).save_pretrained(directory)
    return directory


def test_hive_train_sft_on_synthetic_conversations_learns_and_leaves_a_marker_mode_model(pretrained, tmp_path):
    out = tmp_path / "run"
    result = hive_train(
        "--stage", "sft", "--model_name_or_path", pretrained, "--data_format", "synthetic", "--synthetic_size", 96,
        "--output_dir", out, "--global_batch_size", 8, "--per_device_train_batch_size", 8, "--num_train_epochs", 3,
        "--learning_rate", 3e-3, "--report_to", "none", "--save_strategy", "no",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "reads images at the '<image>' marker" in result.stdout
    report = json.loads((out / "stage4" / "hive_stage.json").read_text())
    assert report["name"] == "instruct" and {
        p for p, c in report["trainable_parameters"].items() if c["trainable"]
    } == {
        "hive",
        "llm",
    }
    losses = report["losses"]
    assert losses[-1] < 0.7 * losses[0], losses
    processor = AutoProcessor.from_pretrained(out / "stage4")
    assert processor.image_token == "<image>"
    assert hive.HiveConfig.from_pretrained(out / "stage4").image_token_id == processor.image_token_id
    chat = [{"role": "user", "content": [{"type": "image", "image": SyntheticConversations(1, image_size=32).shapes.image(0)},
                                         {"type": "text", "text": "what colour is it ?"}]}]  # fmt: skip
    answer = pipeline("image-text-to-text", model=str(out / "stage4"))(text=chat, max_new_tokens=3)
    assert isinstance(answer[0]["generated_text"][-1]["content"], str)


def test_hive_train_sft_reads_llava_instruction_json_and_refuses_it_for_pre_training(pretrained, llava_file, tmp_path):
    out = tmp_path / "run"
    result = hive_train(
        "--stage", "sft", "--model_name_or_path", pretrained, "--data_path", llava_file, "--output_dir", out,
        "--global_batch_size", 4, "--per_device_train_batch_size", 4, "--max_steps", 2, "--report_to", "none",
        "--save_strategy", "no",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert json.loads((out / "stage4" / "hive_stage.json").read_text())["global_steps"] == 2
    refused = hive_train(
        "--stage", "1", "--model_name_or_path", pretrained, "--data_path", llava_file, "--data_format",
        "llava_instruct", "--output_dir", tmp_path / "other", "--report_to", "none",
    )  # fmt: skip
    assert refused.returncode == 2 and "llava_instruct is instruction data: it trains --stage sft" in refused.stderr
