"""The text side of the VLM families (issue 37): `HiveProcessor.from_processor(family_processor)` writes one marker
per image; the family processor's own expansion is refused by name, never read as N images; saved with a composed
HIVE model over the family's encoder, it comes back through `AutoProcessor` and answers in `pipeline`.

Qwen2/2.5/3-VL's processors cannot be built here: they hold a video processor, and transformers' video processors
need torchvision (`Qwen2_5_VLProcessor(...)` fails on `VIDEO_PROCESSOR_MAPPING` without it). HIVE's processor takes
only Qwen's image processor and tokenizer, so it is built from those parts directly (what `from_processor` takes).
"""

from __future__ import annotations

import pytest
import torch
from family_models import FAMILIES, IMAGE_TOKEN, TEXT, open_gates
from hive_checkpoints import make_loud

import hive_adapter as hive


def tiny_tokenizer(special: dict[int, str], named: dict[str, str] | None = None):
    """A word-level tokenizer of the tiny models' vocabulary with the family's special tokens at the given ids;
    `named`: the tokenizer attributes the family's processor reads (Gemma 3's `boi_token`, ...)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, 99)}  # one word per id
    for index, token in special.items():
        vocab = {word: i for word, i in vocab.items() if i != index} | {token: index}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", extra_special_tokens=named or {}
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(special.values())})
    return tokenizer


def chat_template(image_token: str) -> str:
    """A family chat template in the tiny vocabulary: user turns `w7`, assistant turns `w8`, the prompt ends `w9`."""
    return (
        "{%- for message in messages -%}{{ 'w7' if message['role'] == 'user' else 'w8' }}"
        "{%- for part in message['content'] -%}"
        f"{{%- if part['type'] == 'image' -%}}{{{{ ' {image_token}' }}}}"
        "{%- elif part['type'] == 'text' -%}{{ ' ' + part['text'] }}{%- endif -%}"
        "{%- endfor -%}{{ ' </s> ' }}{%- endfor -%}{%- if add_generation_prompt -%}{{ 'w9' }}{%- endif -%}"
    )


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
        image_processor=image_processor,
        tokenizer=tiny_tokenizer(special | rows_cols),
        image_seq_len=4,
        chat_template=chat_template("<image>"),
    )


GEMMA3_BOI = 96  # as tests/family_models.py's Gemma 3 config has it; its image (soft) token is IMAGE_TOKEN


@pytest.fixture(scope="module")
def gemma3_processor():
    """Gemma 3's processor: its image token is `<start_of_image>`, which it expands to itself + `<image_soft_token>`
    x image_seq_length + `<end_of_image>` (no torchvision needed, unlike Pixtral's, InternVL's and Qwen's)."""
    from transformers import Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    named = {"boi_token": "<start_of_image>", "image_token": "<image_soft_token>", "eoi_token": "<end_of_image>"}
    tokenizer = tiny_tokenizer(dict(zip((GEMMA3_BOI, IMAGE_TOKEN, 97), named.values(), strict=True)), named=named)
    image_processor = Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
    return Gemma3Processor(
        image_processor, tokenizer, image_seq_length=4, chat_template=chat_template("<start_of_image>")
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
def test_qwen_image_processor_output_reaches_hive_through_hive_processor(family_wrapped, tmp_path):
    """Qwen2.5-VL's own image processor (packed patches + image_grid_thw) behind a HiveProcessor with Qwen's image
    token: one marker per image, and the model reads the image. (Qwen's full processor also needs a video
    processor, which needs torchvision; `from_processor` takes the same parts from it.)"""
    import numpy as np
    from transformers import AutoProcessor
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
    processor.save_pretrained(tmp_path)  # saved and loaded back without torchvision (no video processor in it)
    again = AutoProcessor.from_pretrained(tmp_path)
    assert type(again.image_processor) is Qwen2VLImageProcessorPil and again.image_token == "<|image_pad|>"
    assert torch.equal(again(images=[image], text=["w3 <|image_pad|>"], return_tensors="pt")["pixel_values"],
                       inputs["pixel_values"])  # fmt: skip
    model = family_wrapped("qwen2_5_vl")
    with open_gates(model):
        seen = model(**inputs).logits
        unseen = model(input_ids=inputs["input_ids"]).logits
    assert not torch.allclose(seen[:, 2:], unseen[:, 2:])


def composed_over_family_encoder(name: str, image_token_id: int = IMAGE_TOKEN):
    """A composed HIVE model: the family's vision encoder + a Llama of the tiny vocabulary, loud (gates open)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tower = FAMILIES[name].build(seed=4).get_encoder(modality="image")
    torch.manual_seed(1)
    language = LlamaForCausalLM(LlamaConfig(**TEXT))
    config = hive.HiveConfig(image_token_id=image_token_id, vision_layers=[1, 3])
    model = hive.HiveForConditionalGeneration.from_vision_text(tower, language, config).eval()
    torch.manual_seed(2)
    make_loud(model)
    return model


@pytest.fixture(scope="module")
def qwen_hive_processor():
    """Qwen2.5-VL's processor needs torchvision to be built here: the HiveProcessor of the parts `from_processor`
    takes from it (its image processor, tokenizer, image token and chat template)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image_processor = Qwen2VLImageProcessorPil(patch_size=4, temporal_patch_size=2, merge_size=2, max_pixels=32 * 32)
    tokenizer = tiny_tokenizer({IMAGE_TOKEN: "<|image_pad|>", 97: "<|vision_start|>", 98: "<|vision_end|>"})
    template = chat_template("<|vision_start|><|image_pad|><|vision_end|>")
    return hive.HiveProcessor(image_processor, tokenizer, chat_template=template, image_token="<|image_pad|>")


def hive_processor_of(family) -> hive.HiveProcessor:
    return family if isinstance(family, hive.HiveProcessor) else hive.HiveProcessor.from_processor(family)


@pytest.mark.parametrize(
    ("name", "family_processor"),
    [("smolvlm", "idefics3_processor"), ("gemma3", "gemma3_processor"), ("qwen2_5_vl", "qwen_hive_processor")],
)
def test_a_from_processor_processor_saved_with_the_model_comes_back_through_auto_processor_and_the_pipeline(
    name, family_processor, request, tmp_path
):
    """The user's one line: HiveProcessor.from_processor(family_processor), saved with the HIVE model into one
    directory; AutoProcessor gives it back (one marker per image, the family's image processor) and
    pipeline("image-text-to-text") answers each picture as generate does, its answer depending on the picture.
    (Qwen: the HiveProcessor built from the parts from_processor takes, Qwen's processor needing torchvision.)"""
    import numpy as np
    from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

    family = request.getfixturevalue(family_processor)
    processor = hive_processor_of(family)
    marker = processor.image_token_id  # Gemma 3's processor writes <start_of_image>
    composed_over_family_encoder(name, marker).save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)

    processor = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(processor, hive.HiveProcessor) and processor.image_token == hive_processor_of(family).image_token
    assert type(processor.image_processor) is type(family.image_processor)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    pipe = pipeline("image-text-to-text", model=str(tmp_path))
    assert isinstance(pipe.model, hive.HiveForConditionalGeneration)
    generator = np.random.default_rng(0)
    answers = []
    for _ in range(4):
        image = (generator.random((32, 32, 3)) * 255).astype("uint8")
        conversation = [
            {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "w3"}]}
        ]
        answer = pipe(text=conversation, max_new_tokens=4)[0]["generated_text"][-1]["content"]
        inputs = processor.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        assert int((inputs["input_ids"] == marker).sum()) == 1
        with torch.no_grad():
            generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        expected = processor.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        assert answer.strip() == expected.strip()  # the pipeline cuts the prompt's text off, keeping the space
        answers.append(answer)
    assert len(set(answers)) > 1, answers  # each request got its own picture


def test_gemma3_pan_and_scan_is_refused_naming_the_setting(gemma3_processor):
    """Pan-and-scan crops come as extra images that the family's processor announces in the text; HIVE reads each
    image once, so a processor that would make them is refused, naming the setting to turn off."""
    import copy

    family = copy.deepcopy(gemma3_processor)
    family.image_processor.do_pan_and_scan = True
    with pytest.raises(ValueError, match=r"do_pan_and_scan=True.*do_pan_and_scan = False"):
        hive.HiveProcessor.from_processor(family)


# ---------------------------------------------------------------------- the families' expanded forms, refused
@pytest.fixture(scope="module")
def llava_next_processor():
    """LLaVA-NeXT's processor: `<image>` x (base features + anyres crop features + newline per row)."""
    from family_models import CROP, PINPOINTS
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": CROP}, crop_size={"height": CROP, "width": CROP}, image_grid_pinpoints=PINPOINTS
    )
    return LlavaNextProcessor(image_processor, tiny_tokenizer({IMAGE_TOKEN: "<image>"}), patch_size=8,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)  # fmt: skip


def image(seed: int, height: int = 32, width: int = 32):
    import numpy as np

    return (np.random.default_rng(seed).random((height, width, 3)) * 255).astype("uint8")


@torch.no_grad()
def test_llava_next_expanded_output_is_refused_and_from_processor_output_is_read(llava_next_processor, family_wrapped):
    family = llava_next_processor(images=[image(0, 30, 60)], text=["w3 <image> w4"], return_tensors="pt")
    assert int((family["input_ids"] == IMAGE_TOKEN).sum()) > 16  # base + crops + newlines, one token each
    model = family_wrapped("llava_next")
    with pytest.raises(ValueError, match=r"expanded form.*HiveProcessor\.from_processor"):
        model(**family)
    inputs = hive.HiveProcessor.from_processor(llava_next_processor)(
        images=[image(0, 30, 60)], text=["w3 <image> w4"], return_tensors="pt"
    )
    assert inputs["input_ids"].tolist() == [[3, IMAGE_TOKEN, 4]]
    with open_gates(model):
        seen, unseen = model(**inputs).logits, model(input_ids=inputs["input_ids"]).logits
    assert not torch.allclose(seen[:, 1:], unseen[:, 1:])


@torch.no_grad()
def test_gemma3_expanded_output_is_refused(gemma3_processor, family_wrapped):
    """Gemma 3's `<start_of_image>` + `<image_soft_token>` x N + `<end_of_image>`, given to the wrapped Gemma 3."""
    family = gemma3_processor(images=[image(1)], text=["w3 <start_of_image> w4"], return_tensors="pt")
    assert int((family["input_ids"] == IMAGE_TOKEN).sum()) == 4
    with pytest.raises(ValueError, match=r"4 image marker tokens \(id 95\) in 1 runs.*expanded form"):
        family_wrapped("gemma3")(input_ids=family["input_ids"], pixel_values=family["pixel_values"])


@torch.no_grad()
def test_qwen_expanded_output_is_refused(family_wrapped):
    """Qwen2.5-VL's processor (which needs torchvision here) writes `<|vision_start|>` + `<|image_pad|>` x
    (patches / merge^2) + `<|vision_end|>`: the same text, from its own image processor's grid, is refused."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image_processor = Qwen2VLImageProcessorPil(patch_size=4, temporal_patch_size=2, merge_size=2, max_pixels=32 * 32)
    pixels = image_processor(images=[image(2, 32, 24)], return_tensors="pt")
    pads = int(pixels["image_grid_thw"].prod()) // 4
    input_ids = torch.tensor([[3, 97, *[IMAGE_TOKEN] * pads, 98, 4]])
    with pytest.raises(ValueError, match=rf"{pads} image marker tokens .* 1 runs .*expanded form"):
        family_wrapped("qwen2_5_vl")(input_ids=input_ids, **pixels)


@torch.no_grad()
def test_a_wrapped_gemma3_reads_from_processor_output_at_start_of_image(gemma3_processor):
    """Gemma 3's processor names `<start_of_image>` as its image token (it writes the soft tokens itself), so the
    HiveProcessor built from it marks each image there; a wrapped Gemma 3 reads them with that marker."""
    from family_models import build_gemma3

    inputs = hive.HiveProcessor.from_processor(gemma3_processor)(
        images=[image(1)], text=["w3 <start_of_image> w4"], return_tensors="pt"
    )
    assert inputs["input_ids"].tolist() == [[3, GEMMA3_BOI, 4]]
    model = hive.get_hive_model(build_gemma3(), hive.HiveConfig(vision_layers=[1, 3], image_token_id=GEMMA3_BOI))
    with open_gates(model):
        seen, unseen = model(**inputs).logits, model(input_ids=inputs["input_ids"]).logits
    assert not torch.allclose(seen[:, 1:], unseen[:, 1:])
    torch.testing.assert_close(seen[:, :1], unseen[:, :1], rtol=0, atol=0)


@torch.no_grad()
def test_an_adapter_saved_with_its_from_processor_processor_loads_both_from_one_directory(
    idefics3_processor, family_wrapped, tmp_path
):
    """The adapter route: HIVE's adapter files and the HiveProcessor in one directory; AutoProcessor gives the
    processor back (still asking Idefics3's image processor for rows and columns), HiveModel.from_pretrained the
    adapter, and the two compute what the saved pair computed."""
    from family_models import build_smolvlm
    from transformers import AutoProcessor

    model = family_wrapped("smolvlm")
    processor = hive.HiveProcessor.from_processor(idefics3_processor)
    inputs = processor(images=[[image(0, 64, 32)]], text=["w3 <image> w4"], return_tensors="pt")
    with open_gates(model, 0.7):
        want = model(**inputs).logits
        model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    again = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(again, hive.HiveProcessor) and again.image_processor.return_row_col_info
    reloaded_inputs = again(images=[[image(0, 64, 32)]], text=["w3 <image> w4"], return_tensors="pt")
    assert reloaded_inputs.keys() == inputs.keys()
    loaded = hive.HiveModel.from_pretrained(build_smolvlm(), tmp_path)
    torch.testing.assert_close(loaded(**reloaded_inputs).logits, want, rtol=0, atol=0)
