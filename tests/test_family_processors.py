"""The text side of the VLM families (issue 37): `HiveProcessor.from_processor(family_processor)` writes one marker
per image; the family processor's own expansion is refused by name, never read as N images."""

from __future__ import annotations

import pytest
import torch
from family_models import IMAGE_TOKEN, open_gates

import hive_adapter as hive


def tiny_tokenizer(special: dict[int, str]):
    """A word-level tokenizer of the tiny models' vocabulary with the family's special tokens at the given ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(99)} | {"<pad>": 0, "<s>": 1, "</s>": 2}
    for index, token in special.items():
        vocab = {word: i for word, i in vocab.items() if i != index} | {token: index}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    tokenizer.add_special_tokens({"additional_special_tokens": list(special.values())})
    return tokenizer


@pytest.fixture(scope="module")
def idefics3_processor():
    from transformers import Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    rows_cols = {80 + 3 * (r - 1) + (c - 1): f"<row_{r}_col_{c}>" for r in range(1, 4) for c in range(1, 4)}
    special = {IMAGE_TOKEN: "<image>", 96: "<fake_token_around_image>", 97: "<global-img>", 98: "<end_of_utterance>"}
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": 64}, max_image_size={"longest_edge": 32}, do_image_splitting=True
    )
    return Idefics3Processor(
        image_processor=image_processor, tokenizer=tiny_tokenizer(special | rows_cols), image_seq_len=4
    )


@torch.no_grad()
def test_from_processor_writes_one_marker_per_image_and_the_family_expansion_is_refused(
    idefics3_processor, family_wrapped
):
    import numpy as np

    image = (np.random.default_rng(0).random((64, 32, 3)) * 255).astype("uint8")  # split into 2x1 crops + global
    text = ["w3 w4 <image> w5 w6"]
    family = idefics3_processor(images=[[image]], text=text, return_tensors="pt")
    assert int((family["input_ids"] == IMAGE_TOKEN).sum()) == 12  # 3 crops x image_seq_len 4
    model = family_wrapped("smolvlm")
    with pytest.raises(ValueError, match=r"expanded form.*HiveProcessor\.from_processor"):
        model(**family)

    processor = hive.HiveProcessor.from_processor(idefics3_processor)
    inputs = processor(images=[[image]], text=text, return_tensors="pt")
    assert inputs["input_ids"].tolist() == [[3, 4, IMAGE_TOKEN, 5, 6]]
    assert inputs["pixel_values"].shape[:2] == (1, 3)
    with open_gates(model):
        seen = model(**inputs).logits
        unseen = model(input_ids=inputs["input_ids"]).logits
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert not torch.allclose(seen[:, 2:], unseen[:, 2:])
    assert generated.shape == (1, 8)


@torch.no_grad()
def test_qwen_image_processor_output_reaches_hive_through_hive_processor(family_wrapped):
    """Qwen2.5-VL's own image processor (packed patches + image_grid_thw) behind a HiveProcessor with Qwen's image
    token: one marker per image, and the model reads the image. (Qwen's full processor also needs a video
    processor, which needs torchvision; `from_processor` takes the same parts from it.)"""
    import numpy as np
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image_processor = Qwen2VLImageProcessorPil(
        patch_size=4, temporal_patch_size=2, merge_size=2, min_pixels=16 * 16, max_pixels=32 * 32
    )
    tokenizer = tiny_tokenizer({IMAGE_TOKEN: "<|image_pad|>", 97: "<|vision_start|>", 98: "<|vision_end|>"})
    processor = hive.HiveProcessor(image_processor, tokenizer, image_token="<|image_pad|>")
    image = (np.random.default_rng(1).random((32, 24, 3)) * 255).astype("uint8")
    inputs = processor(images=[image], text=["w3 <|vision_start|><|image_pad|><|vision_end|> w4"], return_tensors="pt")
    assert inputs["input_ids"].tolist() == [[3, 97, IMAGE_TOKEN, 98, 4]]
    assert inputs["image_grid_thw"].tolist() == [[1, 8, 6]]
    model = family_wrapped("qwen2_5_vl")
    with open_gates(model):
        seen = model(**inputs).logits
        unseen = model(input_ids=inputs["input_ids"]).logits
    assert not torch.allclose(seen[:, 2:], unseen[:, 2:])
