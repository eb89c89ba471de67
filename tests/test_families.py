"""HIVE on the VLM families people train today (issue 37): every contract, per family, on tiny random models built
from each family's own config class and fed the family's own pixel format (tests/family_models.py).

Per family: the parts are found (transformers' get_encoder / get_decoder), gates at 0 give the base's text-only
logits, gradients reach HIVE's modules only, the picture moves the logits once the gates open, a swapped picture
changes only its own sample, generate with the cache equals generate without, unload() is bit-exact, an adapter
saved and loaded computes the same, and the family processor's expanded placeholders are refused by name.
"""

from __future__ import annotations

import pytest
import torch
from family_models import FAMILIES, IMAGE_TOKEN, marker_text
from tiny_models import set_gates

import hive_adapter as hive
from hive_adapter.model.readers import reader_for

NAMES = sorted(FAMILIES)
LENGTH, MARKER_AT = 10, 2


@pytest.fixture(scope="session")
def family_bases():
    """One tiny base per family for the whole session (built lazily: a family costs only when its tests run)."""
    built: dict[str, torch.nn.Module] = {}

    def base(name: str) -> torch.nn.Module:
        if name not in built:
            built[name] = FAMILIES[name].build()
        return built[name]

    return base


@pytest.fixture(scope="session")
def family_wrapped(family_bases):
    """One HIVE model per family, around its session base; tests that open the gates close them again."""
    wrapped: dict[str, hive.HiveModel] = {}

    def model(name: str) -> hive.HiveModel:
        if name not in wrapped:
            wrapped[name] = hive.get_hive_model(family_bases(name), hive.HiveConfig(vision_layers=[1, 3]))
        return wrapped[name]

    return model


def batch_of(name: str, *, seed: int = 5) -> dict:
    """Two samples, one image each (of different sizes), the marker at MARKER_AT."""
    return {"input_ids": marker_text(2, LENGTH, marker_at=MARKER_AT), **FAMILIES[name].pixel_inputs(seed)}


def text_only(batch: dict) -> dict:
    return {"input_ids": batch["input_ids"]}


class open_gates:
    """Gates at `value` inside the block, back to 0 after (the session's models stay at init)."""

    def __init__(self, model, value: float = 1.0):
        self.model, self.value = model, value

    def __enter__(self):
        set_gates(self.model, self.value)

    def __exit__(self, *exc):
        set_gates(self.model, 0.0)


@pytest.mark.parametrize("name", NAMES)
def test_the_parts_are_found_where_transformers_says(name, family_bases, family_wrapped):
    base, model = family_bases(name), family_wrapped(name)
    assert model.hive_vision.tower is base.get_encoder(modality="image")
    assert model._hive_attachment.layers is base.get_decoder().layers
    assert model.hive_vision.reader.name == FAMILIES[name].reader


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_gates_at_zero_give_the_base_text_only_logits(name, family_wrapped):
    batch = batch_of(name)
    got = family_wrapped(name)(**batch).logits
    want = FAMILIES[name].build()(**text_only(batch)).logits  # the same seed: the same weights, never wrapped
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_hive_modules_only(name, family_wrapped):
    model = family_wrapped(name)
    batch = batch_of(name)
    batch["labels"] = batch["input_ids"].clone()
    with open_gates(model, 0.5):
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    model.zero_grad(set_to_none=True)
    hive_names = {n for n, _ in model.hive_named_parameters()}
    assert grads, "no gradient at all"
    assert grads <= hive_names, sorted(grads - hive_names)[:5]
    assert any("projectors" in n for n in grads) and any("hive_blocks" in n for n in grads)


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_the_picture_moves_the_logits_once_gates_open_and_a_swapped_picture_changes_only_its_sample(
    name, family_wrapped
):
    model = family_wrapped(name)
    batch = batch_of(name)
    case = FAMILIES[name]
    with open_gates(model):
        with_picture = model(**batch).logits
        without = model(**text_only(batch)).logits
        # The second image replaced by another of the same size: only sample 1 may change.
        swapped = case.swap_second(batch, case.pixel_inputs(11))
        after_swap = model(**swapped).logits
    assert not torch.allclose(with_picture[:, MARKER_AT:], without[:, MARKER_AT:])
    if case.causal_prompt:  # before the marker the picture is not seen
        torch.testing.assert_close(with_picture[:, :MARKER_AT], without[:, :MARKER_AT], rtol=0, atol=0)
    torch.testing.assert_close(after_swap[0], with_picture[0], rtol=0, atol=0)
    assert not torch.allclose(after_swap[1, MARKER_AT:], with_picture[1, MARKER_AT:])


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_generate_with_the_cache_equals_generate_without(name, family_wrapped):
    model = family_wrapped(name)
    batch = batch_of(name)
    with open_gates(model):
        cached = model.generate(**batch, max_new_tokens=4, do_sample=False, use_cache=True)
        uncached = model.generate(**batch, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    assert cached.shape == (2, LENGTH + 4)


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_unload_gives_back_the_base_bit_exact(name):
    base = FAMILIES[name].build(seed=3)
    batch = text_only(batch_of(name))
    before = base(**batch).logits
    state = {k: v.clone() for k, v in base.state_dict().items()}
    flags = {n: p.requires_grad for n, p in base.named_parameters()}
    model = hive.get_hive_model(base, hive.HiveConfig(vision_layers=[1, 3]))
    set_gates(model, 1.0)
    model(**batch_of(name))
    again = model.unload()
    assert again is base
    assert {n: p.requires_grad for n, p in again.named_parameters()} == flags
    assert again.state_dict().keys() == state.keys()
    assert all(torch.equal(again.state_dict()[k], v) for k, v in state.items())
    assert torch.equal(again(**batch).logits, before)


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_an_adapter_saved_and_loaded_computes_the_same(name, family_wrapped, tmp_path):
    model = family_wrapped(name)
    batch = batch_of(name)
    with open_gates(model, 0.7):
        want = model(**batch).logits
        model.save_pretrained(tmp_path)
    loaded = hive.HiveModel.from_pretrained(FAMILIES[name].build(), tmp_path)
    torch.testing.assert_close(loaded(**batch).logits, want, rtol=0, atol=0)
    loaded.unload()


@pytest.mark.parametrize("name", NAMES)
def test_the_family_processors_expanded_placeholders_are_refused_by_name(name, family_wrapped):
    model = family_wrapped(name)
    batch = batch_of(name)
    expanded = batch["input_ids"].clone()
    expanded[:, MARKER_AT : MARKER_AT + 4] = IMAGE_TOKEN  # a run of placeholders per image, as the family writes
    with pytest.raises(ValueError, match=r"run.*HiveProcessor\.from_processor"):
        model(**dict(batch, input_ids=expanded))


@pytest.mark.parametrize("name", [name for name in NAMES if FAMILIES[name].reader == "qwen-packed-patches"])
def test_pixels_without_their_grid_are_refused_naming_it(name, family_wrapped):
    model = family_wrapped(name)
    batch = batch_of(name)
    with pytest.raises(ValueError, match="image_grid_thw"):
        model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"])


@torch.no_grad()
def test_qwen2_5_vl_window_order_and_merge_blocks_are_undone(family_bases):
    """The reader's per-image states are on a row-major patch grid: re-blocked (2x2 merge blocks) and run through
    the family's own merger they give the encoder's own merged output (in which Qwen2.5-VL undoes its windows),
    and the embedding layer at grid (r, c) is the patch embedding of the image's patch (r, c)."""
    tower = family_bases("qwen2_5_vl").get_encoder(modality="image")
    reader = reader_for(tower)
    inputs = FAMILIES["qwen2_5_vl"].pixel_inputs(7)
    pixel_values, grid = inputs["pixel_values"], inputs["image_grid_thw"]
    read = reader.read(pixel_values, {"image_grid_thw": grid}, layers=(tower.config.depth - 1,))
    merged_by_family = tower(pixel_values, grid_thw=grid).pooler_output
    pieces = []
    for image, (rows, columns) in enumerate([(8, 8), (4, 8)]):
        states = read.states[0][image, : rows * columns]  # (rows*columns, width), row-major
        blocks = states.reshape(rows // 2, 2, columns // 2, 2, -1).permute(0, 2, 1, 3, 4).reshape(rows * columns, -1)
        pieces.append(tower.merger(blocks))
    torch.testing.assert_close(torch.cat(pieces), merged_by_family)
    assert read.grids == [(8, 8), (4, 8)]
    assert read.patch_mask.sum(dim=1).tolist() == [64, 32]


@torch.no_grad()
def test_every_crop_of_an_image_becomes_keys_of_that_image(family_bases):
    """Sample 0: one crop whose bottom 8 pixel rows are padding (4 of 16 patches); sample 1: 2x1 crops + the global
    view, 48 patches, all keys of its one image. Such keys lie on no single grid: pooling them is refused."""
    tower = family_bases("smolvlm").get_encoder(modality="image")
    reader = reader_for(tower)
    inputs = FAMILIES["smolvlm"].pixel_inputs(5)
    pixel_values = inputs.pop("pixel_values")
    assert reader.num_images(pixel_values, inputs) == 2
    read = reader.read(pixel_values, inputs, layers=(3,))
    assert read.patch_mask.sum(dim=1).tolist() == [12, 48]
    assert not read.poolable
    model = hive.get_hive_model(FAMILIES["smolvlm"].build(), hive.HiveConfig(vision_layers=[3], tokens_per_level=4))
    with pytest.raises(ValueError, match="tokens_per_level=4.*do_image_splitting=False"):
        model(**batch_of("smolvlm"))


@torch.no_grad()
def test_a_crop_with_nan_pixels_leaves_only_its_image_out(family_wrapped):
    model = family_wrapped("smolvlm")
    batch = batch_of("smolvlm")
    broken = batch["pixel_values"].clone()
    broken[1, 2, 0, 0, 0] = float("nan")  # the global view of sample 1's image
    with open_gates(model):
        want_first = model(**batch).logits[0]
        without = model(input_ids=batch["input_ids"]).logits[1]
        got = model(**dict(batch, pixel_values=broken)).logits
    torch.testing.assert_close(got[0], want_first, rtol=0, atol=0)
    torch.testing.assert_close(got[1], without, rtol=0, atol=0)


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


@torch.no_grad()
def test_anyres_crops_of_an_image_become_its_keys(family_bases):
    """Image 0 of 30x60 pixels: the 32x64 pinpoint, 2 crops + the whole image = 48 patches; image 1 of 32x32: 1 crop
    + the whole image = 32 patches (its third crop is padding). CLS tokens are not keys."""
    for name in ("llava_next", "llava_onevision"):
        base = family_bases(name)
        reader = reader_for(base.get_encoder(modality="image"), base.config)
        inputs = FAMILIES[name].pixel_inputs(5)
        pixel_values = inputs.pop("pixel_values")
        read = reader.read(pixel_values, inputs, layers=(3,))
        assert read.patch_mask.sum(dim=1).tolist() == [48, 32], name
        assert not read.poolable


@torch.no_grad()
def test_internvl_tiles_of_an_image_become_its_keys(family_bases):
    base = family_bases("internvl")
    reader = reader_for(base.get_encoder(modality="image"), base.config)
    inputs = FAMILIES["internvl"].pixel_inputs(5)
    pixel_values = inputs.pop("pixel_values")
    assert reader.num_images(pixel_values, inputs) == 2
    read = reader.read(pixel_values, inputs, layers=(3,))
    assert read.patch_mask.sum(dim=1).tolist() == [48, 16]  # 3 tiles and 1 tile of 4x4 patches, CLS dropped
    with pytest.raises(ValueError, match=r"num_patches=\[3, 2\] adds up to 5 tiles, pixel_values holds 4"):
        reader.check(pixel_values, {"num_patches": torch.tensor([3, 2])})


@torch.no_grad()
def test_pixtral_images_are_split_back_onto_their_own_grids(family_bases):
    """Pixtral runs all images as one sequence (block-diagonal attention): the reader's image 1 (16x24 pixels, a 2x3
    grid, padded into 32x32) is what the encoder gives that image alone, and it pools on its own grid."""
    tower = family_bases("mistral3").get_encoder(modality="image")
    reader = reader_for(tower, family_bases("mistral3").config)
    inputs = FAMILIES["mistral3"].pixel_inputs(5)
    read = reader.read(inputs["pixel_values"], {"image_sizes": inputs["image_sizes"]}, layers=(1, 3))
    alone = reader.read(inputs["pixel_values"][1:, :, :16, :24], {}, layers=(1, 3))
    assert read.grids == [(4, 4), (2, 3)] and alone.grids == [(2, 3)]
    assert read.patch_mask.sum(dim=1).tolist() == [16, 6]
    for batched, single in zip(read.states, alone.states, strict=True):
        torch.testing.assert_close(batched[1, :6], single[0], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_gemma4_patches_are_placed_on_their_grid_by_position(family_bases):
    """The same patches given in another order (their positions with them) give the same grid: the reader places
    patches by `image_position_ids`, not by their order. Image 1 (a 2x4 grid, 8 padding patches) is masked."""
    tower = family_bases("gemma4").get_encoder(modality="image")
    reader = reader_for(tower)
    inputs = FAMILIES["gemma4"].pixel_inputs(5)
    read = reader.read(inputs["pixel_values"], {"image_position_ids": inputs["image_position_ids"]}, layers=(1, 3))
    shuffle = torch.cat(
        [torch.randperm(16, generator=torch.Generator().manual_seed(0)).unsqueeze(0), torch.arange(16)[None]]
    )
    pixel_values = torch.stack([inputs["pixel_values"][i, shuffle[i]] for i in range(2)])
    positions = torch.stack([inputs["image_position_ids"][i, shuffle[i]] for i in range(2)])
    again = reader.read(pixel_values, {"image_position_ids": positions}, layers=(1, 3))
    assert read.grids == [(4, 4), (2, 4)] and read.patch_mask.sum(dim=1).tolist() == [16, 8]
    for first, second in zip(read.states, again.states, strict=True):
        torch.testing.assert_close(first, second, rtol=1e-5, atol=1e-5)


COMPOSED = ["qwen2_5_vl", "qwen3_vl", "mistral3", "gemma4", "internvl", "smolvlm"]


@pytest.mark.parametrize("name", COMPOSED)
@torch.no_grad()
def test_a_family_encoder_composes_with_a_language_model_and_round_trips_through_auto_model(
    name, family_bases, tmp_path
):
    """HiveForConditionalGeneration.from_vision_text takes Qwen's ViT, Pixtral, Gemma 4's encoder, InternViT and
    SmolVLM's encoder: gates at 0 give the language model's own logits, and AutoModelForImageTextToText loads the
    saved model computing the same."""
    from tiny_models import VOCAB as TINY_VOCAB
    from tiny_models import build_text
    from transformers import AutoModelForImageTextToText

    tower = FAMILIES[name].build(seed=4).get_encoder(modality="image")
    language = build_text("llama")
    model = hive.HiveForConditionalGeneration.from_vision_text(tower, language, hive.HiveConfig(image_token_id=95))
    model.eval()
    batch = {"input_ids": marker_text(2, LENGTH, marker_at=MARKER_AT), **FAMILIES[name].pixel_inputs(5)}
    assert int(batch["input_ids"].max()) < TINY_VOCAB
    assert model.hive_vision.reader.name == FAMILIES[name].reader
    plain = build_text("llama")(input_ids=batch["input_ids"]).logits  # the same seed: the same weights, never hooked
    torch.testing.assert_close(model(**batch).logits, plain, rtol=0, atol=0)
    set_gates(model, 0.5)
    want = model(**batch).logits
    model.save_pretrained(tmp_path)
    again = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(again) is hive.HiveForConditionalGeneration
    torch.testing.assert_close(again(**batch).logits, want, rtol=0, atol=0)


@pytest.mark.parametrize(
    "name, change, message",
    [
        (
            "qwen2_5_vl",
            lambda b: dict(b, image_grid_thw=torch.tensor([[2, 8, 8], [1, 4, 8]])),
            "videos are not supported",
        ),
        ("qwen2_5_vl", lambda b: dict(b, image_grid_thw=torch.tensor([[1, 8, 8], [1, 4, 4]])), "adds up to 80"),
        ("llava_next", lambda b: dict(b, pixel_values=b["pixel_values"][:, 0]), r"takes \(images, crops, 3, 32, 32\)"),
        ("llava_next", lambda b: {k: v for k, v in b.items() if k != "image_sizes"}, "come with image_sizes"),
        ("mistral3", lambda b: dict(b, image_sizes=torch.tensor([[32, 32], [40, 24]])), "at most the padded size"),
        ("gemma4", lambda b: {k: v for k, v in b.items() if k != "image_position_ids"}, "come with image_position_ids"),
        ("smolvlm", lambda b: dict(b, rows=[[0], [1]]), r"make 3 crops, pixel_values holds 4 real"),
        (
            "internvl",
            lambda b: dict(b, pixel_values=b["pixel_values"][:, :, :16]),
            r"tiles of shape \(tiles, 3, 32, 32\)",
        ),
    ],
)
def test_a_family_input_the_encoder_would_misread_is_refused_naming_it(name, change, message, family_wrapped):
    with pytest.raises(ValueError, match=message):
        family_wrapped(name)(**change(batch_of(name)))
