"""HiveProcessor: AutoProcessor, chat template, pipeline("image-text-to-text"), image-count refusals.

Every model here is a composed `HiveForConditionalGeneration` saved the way a user saves one (model + processor
into one directory); `test_train.py` checks the same on the stage directories hive-train writes.
"""

import json

import pytest
import torch
from hive_checkpoints import save_hive_checkpoint, solid_images, toy_models
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer, pipeline

import hive_adapter as hive
from hive_adapter.model.processing_hive import llava_chat_template

QUESTION = "what shape is it ?"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return toy_models(tmp_path_factory.mktemp("toy"))


def with_processor(directory, models):
    """`directory` (a saved HIVE model) with its HiveProcessor saved next to it, as a user composes one."""
    from transformers import AutoImageProcessor

    model_config = hive.HiveConfig.from_pretrained(directory)
    processor = hive.HiveProcessor.for_model(
        model_config,
        tokenizer=AutoTokenizer.from_pretrained(models[1]),
        image_processor=AutoImageProcessor.from_pretrained(models[0]),
    )
    processor.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def marker_model(models, tmp_path_factory):
    """Marker mode: `<image>` stands where each image goes (several per sample, or none)."""
    marker = AutoTokenizer.from_pretrained(models[1]).convert_tokens_to_ids("<image>")
    directory = save_hive_checkpoint(models, tmp_path_factory.mktemp("marker"), image_token_id=marker, loud=True)
    return with_processor(directory, models)


@pytest.fixture(scope="module")
def caption_model(models, tmp_path_factory):
    """Captioning mode (hive-train's default): no marker, one image per sample."""
    return with_processor(save_hive_checkpoint(models, tmp_path_factory.mktemp("caption")), models)


@pytest.fixture(scope="module")
def images():
    return solid_images(8)


def user(*parts):
    return [{"role": "user", "content": list(parts)}]


def image_part(image):
    return {"type": "image", "image": image}


def text_part(text=QUESTION):
    return {"type": "text", "text": text}


def greedy(model, inputs, tokens=6):
    out = model.generate(**inputs, max_new_tokens=tokens, do_sample=False)
    return out[:, inputs["input_ids"].shape[1] :]


# ---------------------------------------------------------------------- loading and saving
def test_auto_processor_loads_a_hive_processor_with_the_models_marker(marker_model, caption_model):
    processor = AutoProcessor.from_pretrained(marker_model)
    assert isinstance(processor, hive.HiveProcessor)
    assert processor.image_token == "<image>" and processor.image_token_id == processor.tokenizer.convert_tokens_to_ids(
        "<image>"
    )
    assert processor.image_token_id == hive.HiveConfig.from_pretrained(marker_model).image_token_id
    captioning = AutoProcessor.from_pretrained(caption_model)
    assert isinstance(captioning, hive.HiveProcessor) and captioning.image_token is None
    assert (marker_model / "processor_config.json").is_file()


def test_a_directory_saved_without_a_processor_still_gets_one(models, tmp_path):
    """Stage directories written before processors were saved hold a tokenizer and an image processor only."""
    marker = AutoTokenizer.from_pretrained(models[1]).convert_tokens_to_ids("<image>")
    directory = save_hive_checkpoint(models, tmp_path / "old", image_token_id=marker)
    assert not (directory / "processor_config.json").exists()
    processor = AutoProcessor.from_pretrained(directory)
    assert isinstance(processor, hive.HiveProcessor) and processor.image_token == "<image>"
    assert processor.chat_template == llava_chat_template("<image>")


def test_a_replaced_chat_template_is_saved_and_loaded(marker_model, tmp_path):
    processor = AutoProcessor.from_pretrained(marker_model)
    processor.chat_template = "{% for m in messages %}Q: {{ m['content'][-1]['text'] }}{% endfor %}A:"
    processor.save_pretrained(tmp_path)
    again = AutoProcessor.from_pretrained(tmp_path)
    assert again.chat_template == processor.chat_template
    assert again.apply_chat_template(user(text_part("hi"))) == "Q: hiA:"


def test_a_marker_that_is_not_one_token_is_refused(models):
    from transformers import AutoImageProcessor

    with pytest.raises(ValueError, match=r"image_token='<img>' is not a single token.*add_special_tokens"):
        hive.HiveProcessor(
            AutoImageProcessor.from_pretrained(models[0]), AutoTokenizer.from_pretrained(models[1]), image_token="<img>"
        )


# ---------------------------------------------------------------------- the chat template
def test_the_chat_template_lays_out_llava_1_5_and_masks_exactly_the_assistant_turns(marker_model, images):
    processor = AutoProcessor.from_pretrained(marker_model)
    conversation = [
        {"role": "user", "content": [image_part(images[0]), text_part()]},
        {"role": "assistant", "content": [text_part("a red square")]},
        {"role": "user", "content": "what colour is it ?"},
        {"role": "assistant", "content": "red"},
    ]
    text = processor.apply_chat_template(conversation)
    assert text == (
        "<bos>USER: <image>\nwhat shape is it ? ASSISTANT: a red square<eos> USER: what colour is it ? "
        "ASSISTANT: red<eos> "
    )
    assert processor.apply_chat_template(conversation[:1], add_generation_prompt=True).endswith(
        "what shape is it ? ASSISTANT:"
    )
    out = processor.apply_chat_template(
        conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, return_tensors="pt"
    )
    ids, mask = out["input_ids"][0].tolist(), out["assistant_masks"][0].tolist()
    learned = processor.tokenizer.convert_ids_to_tokens([i for i, m in zip(ids, mask, strict=True) if m])
    assert learned == ["a", "red", "square", "<eos>", "red", "<eos>"]
    assert out["pixel_values"].shape == (1, 3, 32, 32)


def test_captioning_mode_renders_no_marker(caption_model, images):
    processor = AutoProcessor.from_pretrained(caption_model)
    assert processor.apply_chat_template(user(image_part(images[0]), text_part()), add_generation_prompt=True) == (
        "<bos>USER: what shape is it ? ASSISTANT:"
    )


# ---------------------------------------------------------------------- processing
def test_markers_pad_left_and_a_batch_mixes_samples_with_and_without_images(marker_model, images):
    processor = AutoProcessor.from_pretrained(marker_model)
    batch = processor(
        images=[images[0], images[1], images[2]],
        text=["<image> <image> what shape is it ?", "what", "a <image> circle"],
        return_tensors="pt",
    )
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    assert batch["input_ids"].shape[0] == 3 and batch["attention_mask"][1, 0] == 0  # left padding
    marker = processor.image_token_id
    assert (batch["input_ids"] == marker).sum(dim=1).tolist() == [2, 0, 1]


def test_an_image_count_that_does_not_match_the_markers_is_refused_naming_both(marker_model, caption_model, images):
    processor = AutoProcessor.from_pretrained(marker_model)
    with pytest.raises(ValueError, match=r"2 image markers '<image>' \(per sample: \[2\]\) but 1 images were given"):
        processor(images=[images[0]], text=["<image> <image> what"])
    with pytest.raises(ValueError, match=r"0 image markers .* but 1 images"):
        processor(images=images[0], text="what shape is it ?")
    with pytest.raises(ValueError, match=r"1 image markers .* but 0 images"):
        processor(text="<image> what")
    with pytest.raises(ValueError, match=r"images per sample: \[2, 0\]"):  # right total, wrong samples
        processor(images=[[images[0], images[1]], []], text=["<image> a", "<image> b"])
    captioning = AutoProcessor.from_pretrained(caption_model)
    with pytest.raises(ValueError, match=r"exactly one image with each sample .* got 2 images for 1 samples"):
        captioning(images=[[images[0], images[1]]], text=["what"])
    with pytest.raises(ValueError, match=r"got 1 images for 2 samples"):
        captioning(images=[images[0]], text=["a", "b"])
    assert captioning(images=[images[0], images[1]], text=["a", "b"], return_tensors="pt")["pixel_values"].shape[0] == 2
    assert "pixel_values" not in captioning(text=["a", "b"], return_tensors="pt")  # no image at all: text alone


# ---------------------------------------------------------------------- pipeline("image-text-to-text")
def test_the_pipeline_answers_single_several_batched_and_chat_inputs_as_generate_does(marker_model, images):
    model = AutoModelForImageTextToText.from_pretrained(marker_model).eval()
    processor = AutoProcessor.from_pretrained(marker_model)
    pipe = pipeline("image-text-to-text", model=str(marker_model))
    assert isinstance(pipe.processor, hive.HiveProcessor) and isinstance(pipe.model, hive.HiveForConditionalGeneration)

    def expected(conversation):
        inputs = processor.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        return processor.batch_decode(greedy(model, inputs), skip_special_tokens=True)[0]

    def answer(result):
        return result[0]["generated_text"][-1]["content"]

    single = user(image_part(images[0]), text_part())
    several = user(image_part(images[1]), image_part(images[2]), text_part("which is larger ?"))
    text_only = user(text_part("what is it ?"))
    for conversation in (single, several, text_only):
        assert answer(pipe(text=conversation, max_new_tokens=6)) == expected(conversation)
    other = user(image_part(images[3]), text_part("what colour is it ?"))
    batched = pipe(text=[single, several, other], batch_size=3, max_new_tokens=6)
    assert [answer(result) for result in batched] == [expected(c) for c in (single, several, other)]
    # the answers depend on the images: a swapped image changes them (else the equalities above prove little)
    answers = {expected(user(image_part(image), text_part())) for image in images}
    assert len(answers) > 1, answers
    # plain text with its marker, not a chat
    plain = pipe(images=images[0], text="<image> what shape is it ?", max_new_tokens=6)
    inputs = processor(images=images[0], text="<image> what shape is it ?", return_tensors="pt")
    assert plain[0]["generated_text"].endswith(processor.batch_decode(greedy(model, inputs))[0])


def test_the_pipeline_answers_a_captioning_model(caption_model, images):
    pipe = pipeline("image-text-to-text", model=str(caption_model))
    result = pipe(text=user(image_part(images[0]), text_part()), max_new_tokens=4)
    assert isinstance(result[0]["generated_text"][-1]["content"], str)
    with pytest.raises(ValueError, match="exactly one image with each sample"):
        pipe(text=user(image_part(images[0]), image_part(images[1]), text_part()), max_new_tokens=4)


def test_processor_config_names_the_marker(marker_model, caption_model):
    assert json.loads((marker_model / "processor_config.json").read_text())["image_token"] == "<image>"
    assert json.loads((caption_model / "processor_config.json").read_text())["image_token"] is None
    assert torch.is_tensor(AutoProcessor.from_pretrained(caption_model)(text="a", return_tensors="pt")["input_ids"])


# ---------------------------------------------------------------------- issue 36, items 15-16
def test_a_batch_of_images_as_one_4d_array_or_tensor_counts_as_that_many_images(marker_model, images):
    """(2, H, W, 3) numpy or (2, 3, H, W) torch is two images, as LlavaProcessor and the image processor read it."""
    import numpy as np

    processor = AutoProcessor.from_pretrained(marker_model)
    as_numpy = np.stack([np.asarray(image) for image in images[:2]])  # (2, 32, 32, 3)
    as_torch = torch.from_numpy(as_numpy).permute(0, 3, 1, 2).contiguous()  # (2, 3, 32, 32)
    two_markers = "<image> <image> which ?"
    expected = processor(images=images[:2], text=two_markers, return_tensors="pt")
    for batch in (as_numpy, as_torch):
        inputs = processor(images=batch, text=two_markers, return_tensors="pt")
        assert inputs["pixel_values"].shape[0] == 2
        assert torch.equal(inputs["input_ids"], expected["input_ids"])
        with pytest.raises(ValueError, match=r"1 image markers .* but 2 images were given"):
            processor(images=batch, text="<image> which ?", return_tensors="pt")


def test_for_model_refuses_a_marker_id_outside_the_tokenizer(models):
    """A model whose marker id lies beyond the tokenizer's vocabulary would otherwise get a captioning-mode
    processor that silently drops every image."""
    from transformers import AutoImageProcessor

    tokenizer = AutoTokenizer.from_pretrained(models[1])
    config = hive.HiveConfig(image_token_id=len(tokenizer) + 5)
    refusal = rf"image_token_id={len(tokenizer) + 5} is not a token .*\({len(tokenizer)} tokens\)"
    with pytest.raises(ValueError, match=refusal):
        hive.HiveProcessor.for_model(
            config, tokenizer=tokenizer, image_processor=AutoImageProcessor.from_pretrained(models[0])
        )
