"""Packed sequences: several samples per row, position ids restarting per sample, block-diagonal self-attention
(transformers' own packed-sequence masks), each token's cross-attention limited to its own sample's images.

The reference is the padded batch of the same samples: loss and gradients must agree within float tolerance.
"""

import pytest
import torch
from tiny_models import (
    IMAGE_TOKEN,
    assert_packed_equals_padded,
    build_text,
    build_vision,
    set_gates,
    spliced_position_ids,
    vision_inputs,
)

import hive_adapter as hive
from hive_adapter.data.collator import pack_rows
from hive_adapter.model.packing import packed_segments
from hive_adapter.model.splice import IGNORE_INDEX

LENGTHS = [5, 9, 3, 7, 6]  # five samples of different lengths
CONNECTORS = ["hive", "cascaded", "concat", "deepstack"]
SPLICING = ("concat", "deepstack")  # image tokens enter the sequence: the rows get longer


def model_for(connector: str, *, image_token_id: int | None = None, media_attention: str = "previous", seed=0):
    config = hive.HiveConfig(
        connector=connector,
        vision_layers=[1, 3],
        **({} if connector in SPLICING else {"llm_layers": [1, 3]}),
        tokens_per_level=4,
        use_ffn=True,
        image_token_id=image_token_id,
        media_attention=media_attention,
    )
    torch.manual_seed(seed)
    model = hive.HiveForConditionalGeneration.from_vision_text(build_vision("clip"), build_text("llama"), config)
    set_gates(model, 0.7)
    return model.train()


def samples(lengths=LENGTHS, *, markers: dict[int, list[int]] | None = None, seed=5):
    """(ids, labels) per sample: BOS-like first token unlabelled, the rest labelled; `markers` puts image markers
    at the given columns of the given samples."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for number, length in enumerate(lengths):
        ids = torch.randint(1, IMAGE_TOKEN - 1, (length,), generator=generator).tolist()
        for column in (markers or {}).get(number, []):
            ids[column] = IMAGE_TOKEN
        labels = [IGNORE_INDEX] + [i if i != IMAGE_TOKEN else IGNORE_INDEX for i in ids[1:]]
        out.append((ids, labels))
    return out


def padded(encoded, pad=0):
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), pad)
    labels = torch.full((len(encoded), width), IGNORE_INDEX)
    mask = torch.zeros(len(encoded), width, dtype=torch.long)
    for row, (ids, target) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(target)
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def packed_and_padded(encoded, pixels, capacity, *, pixels_per_sample=None):
    """The same samples padded (one per row) and packed (`pack_rows`), with the pixels in each one's order."""
    reference = {**padded(encoded), "pixel_values": pixels}
    packed, order = pack_rows(encoded, capacity=capacity, pad_token_id=0)
    per_sample = pixels_per_sample or [[i] for i in range(len(encoded))]
    packed["pixel_values"] = pixels[[index for sample in order for index in per_sample[sample]]]
    return reference, packed, order


@pytest.mark.parametrize("connector", CONNECTORS)
def test_packed_equals_padded_loss_and_gradients(connector):
    encoded = samples()
    pixels = vision_inputs("clip", len(encoded))["pixel_values"]
    reference, packed, order = packed_and_padded(encoded, pixels, capacity=14)
    assert packed["input_ids"].shape[0] < len(encoded) and "attention_mask" not in packed  # really packed
    assert sorted(order) == list(range(len(encoded)))
    spans = None
    if connector not in SPLICING:  # token by token: each packed sample's logits are its padded row's
        rows = segment_spans(packed["position_ids"], len(encoded), order)
        spans = {sample: (row, start, len(encoded[sample][0])) for sample, (row, start) in rows.items()}
    assert_packed_equals_padded(model_for(connector), packed, reference, spans=spans)


def segment_spans(position_ids, count, order):
    """sample -> (row, first column) in the packed batch."""
    spans, number = {}, 0
    for row in range(position_ids.shape[0]):
        starts = (position_ids[row] == 0).nonzero().flatten().tolist()
        for start in starts:
            if number < count:
                spans[order[number]] = (row, start)
                number += 1
    return spans


@pytest.mark.parametrize("media_attention", ["previous", "all_previous"])
def test_packed_equals_padded_with_markers_and_a_text_only_sample(media_attention):
    """Image markers inside samples (two images in one sample, none in another): slots stay within a sample."""
    markers = {0: [1], 1: [1, 5], 3: [2]}  # sample 2 and 4 have no image
    encoded = samples(markers=markers)
    per_sample, next_image = [], 0
    for number in range(len(encoded)):
        count = len(markers.get(number, []))
        per_sample.append(list(range(next_image, next_image + count)))
        next_image += count
    pixels = vision_inputs("clip", next_image)["pixel_values"]
    reference, packed, order = packed_and_padded(encoded, pixels, capacity=16, pixels_per_sample=per_sample)
    model = model_for("hive", image_token_id=IMAGE_TOKEN, media_attention=media_attention)
    assert_packed_equals_padded(model, packed, reference)


@pytest.mark.parametrize("connector", CONNECTORS)
def test_swapping_one_samples_image_changes_only_that_samples_tokens(connector):
    encoded = samples()
    pixels = vision_inputs("clip", len(encoded))["pixel_values"]
    _, packed, order = packed_and_padded(encoded, pixels, capacity=30)
    assert packed["input_ids"].shape[0] == 1  # every sample in one row
    model = model_for(connector).eval()
    swapped = dict(packed)
    swapped["pixel_values"] = packed["pixel_values"].clone()
    target = 2  # the third sample of the row
    swapped["pixel_values"][target] = vision_inputs("clip", 1, seed=9)["pixel_values"][0]
    with torch.no_grad():
        before, after = model(**packed).logits[0], model(**swapped).logits[0]
    # concat, deepstack: the image tokens sit in front of each sample's text, so find the samples by their position ids
    positions = packed["position_ids"][0] if connector not in SPLICING else spliced_position_ids(model, packed)[0]
    starts = (positions == 0).nonzero().flatten().tolist()
    ends = starts[1:] + [len(positions)]
    changed = (before - after).abs().amax(-1)
    for number, (start, end) in enumerate(zip(starts, ends, strict=True)):
        if number == target:
            assert changed[start:end].min() > 1e-6, (number, changed[start:end])
        elif number < len(encoded):
            assert changed[start:end].max() == 0, (number, changed[start:end])


def test_packed_segments_follow_transformers_restart_rule():
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0, 1, 2]])
    segments = packed_segments(position_ids, attention_mask=None, past_key_values=None)
    assert segments.tolist() == [[0, 0, 0, 1, 1, 2, 2, 2, 2], [0, 0, 0, 0, 0, 0, 1, 1, 1]]
    assert packed_segments(torch.arange(6)[None].expand(2, 6), attention_mask=None, past_key_values=None) is None
    # transformers' rule: with an attention mask or a cache the rows are not packed
    assert packed_segments(position_ids, attention_mask=torch.ones(2, 9), past_key_values=None) is None


def test_pack_rows_keeps_samples_whole_and_labels_inside_them():
    encoded = samples([5, 9, 3, 7, 6, 14])
    batch, order = pack_rows(encoded, capacity=14, pad_token_id=0)
    rows, width = batch["input_ids"].shape
    assert width == 14 and rows == 4  # first-fit decreasing: 14 | 9+5 | 7+6 | 3
    seen = []
    for row in range(rows):
        positions = batch["position_ids"][row].tolist()
        starts = [c for c, p in enumerate(positions) if p == 0]
        for start, end in zip(starts, [*starts[1:], width], strict=True):
            sample = order[len(seen)]
            ids, labels = encoded[sample]
            assert batch["input_ids"][row, start : start + len(ids)].tolist() == ids
            assert batch["labels"][row, start] == IGNORE_INDEX  # no label across a sample boundary
            assert batch["labels"][row, start + 1 : start + len(ids)].tolist() == labels[1:]
            assert (batch["labels"][row, start + len(ids) : end] == IGNORE_INDEX).all()  # the row's padding
            seen.append(sample)
    assert sorted(seen) == list(range(len(encoded)))
    with pytest.raises(ValueError, match="packing_length=4.*longest sample has 14 tokens"):
        pack_rows(encoded, capacity=4, pad_token_id=0)


def test_a_packed_batch_with_a_cache_or_in_generate_is_refused():
    model = model_for("hive").eval()
    encoded = samples()
    pixels = vision_inputs("clip", len(encoded))["pixel_values"]
    _, packed, _ = packed_and_padded(encoded, pixels, capacity=30)
    with pytest.raises(ValueError, match="use_cache=True.*packed"):
        model(**packed, use_cache=True)
    with pytest.raises(ValueError, match=r"generate\(\) got a packed batch"):
        model.generate(
            input_ids=packed["input_ids"], position_ids=packed["position_ids"], pixel_values=pixels, max_new_tokens=2
        )


def test_packed_layout_gathers_each_sample_into_its_own_row_and_back():
    from hive_adapter.model.packing import PackedLayout

    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0, 1, 2]])
    layout = PackedLayout.from_segments(packed_segments(position_ids, attention_mask=None, past_key_values=None))
    assert (layout.samples, layout.width) == (5, 6)
    values = torch.arange(18).view(2, 9) * 10
    gathered = layout.gather(values)
    expected = [[0, 10, 20], [30, 40], [50, 60, 70, 80], [90, 100, 110, 120, 130, 140], [150, 160, 170]]
    for sample, want in enumerate(expected):
        assert gathered[sample][layout.valid[sample]].tolist() == want
        assert layout.valid[sample].sum() == len(want)
    assert torch.equal(layout.scatter(gathered), values)
    features = torch.randn(2, 9, 3)
    assert torch.equal(layout.scatter(layout.gather(features)), features)
