"""Packed instruction tuning (`hive-train --stage sft --packing`): conversations several to a row through
`HiveConversationCollator(packing_length=)`, each with its own images (none, one or two), position ids restarting
per conversation, labels on its assistant tokens only. The reference is the padded batch of the same
conversations: loss and gradients must agree within float tolerance; swapping one conversation's image changes
only that conversation's logits; a packed sft run trains as the padded one and resumes to the same bytes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hive_checkpoints import SIZES, VISION_LAYERS, save_hive_checkpoint
from killed_runs import resumes_to_the_same_bytes
from tiny_models import assert_packed_equals_padded, set_gates, spliced_position_ids
from transformers import AutoModel, AutoModelForCausalLM

import hive_adapter as hive
from hive_adapter.data.conversations import HiveConversationCollator, SyntheticConversations
from hive_adapter.model.loading import load_vision_encoder
from hive_adapter.model.splice import IGNORE_INDEX

CONNECTORS = ["hive", "cascaded", "concat"]
# Synthetic conversations 0-9: 7 is text-only, 9 shows two pictures, the others one (some of two rounds).
PICKED = (0, 7, 9, 1, 2, 8)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def conversations():
    data = SyntheticConversations(10, image_size=SIZES.image_size)
    return data, [data[i] for i in PICKED]


def marker_model(toy, processor, connector: str):
    """A marker-mode model (as the sft stage trains one) with its gates open."""
    torch.manual_seed(0)
    config = hive.HiveConfig(
        connector=connector,
        vision_layers=VISION_LAYERS,
        **({} if connector == "concat" else {"llm_layers": [0, 1]}),
        tokens_per_level=4,
        image_token_id=processor.image_token_id,
    )
    model = hive.HiveForConditionalGeneration.from_vision_text(
        load_vision_encoder(toy[0]), AutoModelForCausalLM.from_pretrained(toy[1]), config
    )
    set_gates(model, 0.7)
    return model.train()


def sample_spans(position_ids: torch.Tensor, order: list[int]) -> dict[int, tuple[int, int, int]]:
    """conversation -> (row, first column, end column) in a packed batch (a row's padding ends its last one)."""
    spans, number = {}, 0
    for row in range(position_ids.shape[0]):
        starts = (position_ids[row] == 0).nonzero().flatten().tolist()
        for start, end in zip(starts, [*starts[1:], position_ids.shape[1]], strict=True):
            spans[order[number]] = (row, start, end)
            number += 1
    return spans


def packed_order(batch: dict, padded: dict) -> list[int]:
    """Which padded row each packed conversation is, found by its tokens (the collator sorts them by length)."""
    order = []
    for row in range(batch["input_ids"].shape[0]):
        positions = batch["position_ids"][row]
        starts = (positions == 0).nonzero().flatten().tolist()
        for start in starts:
            for sample in range(padded["input_ids"].shape[0]):
                length = int(padded["attention_mask"][sample].sum())
                if sample not in order and torch.equal(
                    batch["input_ids"][row, start : start + length], padded["input_ids"][sample, :length]
                ):
                    order.append(sample)
                    break
    return order


def test_the_packed_collator_keeps_each_conversation_whole_with_its_own_images_in_order(
    instruction_processor, conversations
):
    _, samples = conversations
    padded = HiveConversationCollator(instruction_processor, max_length=40)(samples)
    batch = HiveConversationCollator(instruction_processor, max_length=40, packing_length=40)(samples)
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] < len(samples)  # really packed
    order = packed_order(batch, padded)
    assert sorted(order) == list(range(len(samples)))
    marker = instruction_processor.image_token_id
    images = (padded["input_ids"] == marker).sum(dim=1).tolist()
    assert sorted(images) == [0, 1, 1, 1, 1, 2]  # text-only and two-picture conversations in the batch
    first = [sum(images[:sample]) for sample in range(len(samples))]
    expected = torch.cat([padded["pixel_values"][first[s] : first[s] + images[s]] for s in order])
    assert torch.equal(batch["pixel_values"], expected)  # each conversation's pictures, in the order they stand
    for sample, (row, start, end) in sample_spans(batch["position_ids"], order).items():
        length = int(padded["attention_mask"][sample].sum())
        assert batch["position_ids"][row, start : start + length].tolist() == list(range(length))
        assert torch.equal(batch["input_ids"][row, start : start + length], padded["input_ids"][sample, :length])
        # assistant-only labels, the conversation's own; none across a boundary or on the row's padding
        assert batch["labels"][row, start] == IGNORE_INDEX
        assert torch.equal(batch["labels"][row, start : start + length], padded["labels"][sample, :length])
        assert (batch["labels"][row, start + length : end] == IGNORE_INDEX).all()
    assert (batch["labels"] != IGNORE_INDEX).sum() == (padded["labels"] != IGNORE_INDEX).sum()


def test_a_packing_length_shorter_than_a_conversation_may_be_is_refused_by_name(instruction_processor, conversations):
    with pytest.raises(ValueError, match=r"packing_length=16: shorter than max_length=40.*--packing_length"):
        HiveConversationCollator(instruction_processor, max_length=40, packing_length=16)


@pytest.mark.parametrize("connector", CONNECTORS)
def test_packed_conversations_give_the_padded_loss_and_gradients(
    instruction_toy, instruction_processor, conversations, connector
):
    """Text-only, one-picture, two-picture and two-round conversations, packed two or three to a row."""
    _, samples = conversations
    padded = HiveConversationCollator(instruction_processor, max_length=40)(samples)
    packed = HiveConversationCollator(instruction_processor, max_length=40, packing_length=40)(samples)
    assert packed["input_ids"].shape[0] < len(samples)
    spans = None
    if connector != "concat":  # token by token: each packed conversation's logits are its padded row's
        order = packed_order(packed, padded)
        spans = {
            sample: (row, start, int(padded["attention_mask"][sample].sum()))
            for sample, (row, start, _) in sample_spans(packed["position_ids"], order).items()
        }
    assert_packed_equals_padded(
        marker_model(instruction_toy, instruction_processor, connector), packed, padded, spans=spans
    )


@pytest.mark.parametrize("connector", CONNECTORS)
def test_swapping_one_conversations_picture_changes_only_its_own_tokens(
    instruction_toy, instruction_processor, conversations, connector
):
    data, samples = conversations
    collator = HiveConversationCollator(instruction_processor, max_length=40, packing_length=200)
    target = PICKED.index(2)  # a one-picture conversation, packed among the others
    swapped = [*samples[:target], data.swapped(PICKED[target]), *samples[target + 1 :]]
    batch, other = collator(samples), collator(swapped)
    assert batch["input_ids"].shape[0] == 1 and torch.equal(batch["input_ids"], other["input_ids"])  # one row
    assert not torch.equal(batch["pixel_values"], other["pixel_values"])
    model = marker_model(instruction_toy, instruction_processor, connector).eval()
    with torch.no_grad():
        before, after = model(**batch).logits[0], model(**other).logits[0]
    changed = (before - after).abs().amax(-1)
    padded = HiveConversationCollator(instruction_processor, max_length=40)(samples)
    order = packed_order(batch, padded)
    spans = sample_spans(batch["position_ids"], order)
    if connector == "concat":  # its image tokens sit inside each conversation: find them by the spliced positions
        positions = spliced_position_ids(model, batch)[0]
        starts = (positions == 0).nonzero().flatten().tolist()
        spans = {s: (0, a, b) for s, a, b in zip(order, starts, [*starts[1:], len(positions)], strict=True)}
    marker = instruction_processor.image_token_id
    for sample, (_, start, end) in spans.items():
        if sample != target:
            assert changed[start:end].max() == 0, (sample, changed[start:end])
            continue
        if connector == "concat":
            assert changed[start:end].max() > 1e-6
            continue
        first_marker = start + (batch["input_ids"][0, start:end] == marker).nonzero().flatten()[0].item()
        assert changed[start:first_marker].max() == 0  # before its marker a token sees no picture
        assert changed[first_marker:end].min() > 1e-6, changed[first_marker:end]


# ---------------------------------------------------------------------- hive-train --stage sft --packing
def hive_train(*args, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "hive_adapter.training.train", *map(str, args)], capture_output=True,
                            text=True, env=ENV, timeout=900)  # fmt: skip
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def stage3(instruction_toy, tmp_path_factory) -> Path:
    """A captioning-mode HIVE checkpoint as stage 3 leaves one (the sft stage switches it to the marker)."""
    return save_hive_checkpoint(instruction_toy, tmp_path_factory.mktemp("stage3"))


def sft(stage3: Path, out: Path, *extra) -> list[str]:
    """16 synthetic conversations (text-only and two-picture ones among them), 4 steps of 4; rows of 32 tokens
    hold two conversations."""
    return [str(a) for a in [
        "--stage", "sft", "--model_name_or_path", stage3, "--data_format", "synthetic", "--synthetic_size", 16,
        "--output_dir", out, "--global_batch_size", 4, "--per_device_train_batch_size", 4, "--num_train_epochs", 1,
        "--max_text_length", 32, "--learning_rate", 1e-3, "--seed", 0, "--report_to", "none",
        "--disable_tqdm", "True", "--logging_steps", 1, *extra,
    ]]  # fmt: skip


def stage_losses(out: Path) -> list[float]:
    return json.loads((out / "stage4" / "hive_stage.json").read_text())["losses"]


def test_hive_train_sft_packed_trains_as_padded(stage3, tmp_path):
    padded = tmp_path / "padded"
    hive_train(*sft(stage3, padded, "--save_strategy", "no"))
    packed = tmp_path / "packed"
    result = hive_train(*sft(stage3, packed, "--save_strategy", "no", "--packing"))
    assert "packed rows of 32 tokens" in result.stdout
    report = json.loads((packed / "stage4" / "hive_stage.json").read_text())
    assert report["packing_length"] == 32 and report["global_steps"] == 4
    assert stage_losses(packed) == pytest.approx(stage_losses(padded), rel=1e-5, abs=1e-6)
    want = AutoModel.from_pretrained(padded / "stage4").state_dict()
    got = AutoModel.from_pretrained(packed / "stage4").state_dict()
    assert got.keys() == want.keys()
    for key, tensor in want.items():
        torch.testing.assert_close(got[key], tensor, rtol=1e-4, atol=1e-6, msg=key)


def test_a_killed_packed_sft_run_resumes_to_the_same_bytes(stage3, tmp_path):
    def arguments(out: Path) -> list[str]:
        return sft(stage3, out, "--save_strategy", "steps", "--save_steps", 2, "--packing")

    resumed = resumes_to_the_same_bytes(arguments, tmp_path, stage=4, kill_at=2, env=ENV)
    assert "packed rows of 32 tokens" in resumed.stdout
