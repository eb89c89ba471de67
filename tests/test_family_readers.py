"""How each family's vision reader reads its pixels (issue 37): Qwen2.5-VL's window and merge-block order undone,
crops / anyres crops / tiles of an image become that image's keys, Pixtral's packed images split back, Gemma 4's
patches placed by position, NaN crops left out per image, and each reader's refusals named."""

from __future__ import annotations

import pytest
import torch
from family_models import FAMILIES, batch_of, open_gates

import hive_adapter as hive
from hive_adapter.model.readers import reader_for


@torch.no_grad()
def test_qwen2_5_vl_window_order_and_merge_blocks_are_undone(family_bases):
    """The reader's per-image states are on a row-major patch grid: re-blocked (2x2 merge blocks) and run through
    the family's own merger they give the encoder's own merged output (in which Qwen2.5-VL undoes its windows),
    and at grid (r, c) the embeddings (`hidden_states[0]`, layer index -1) are the patch embedding of the input
    patch that Qwen's block-major order puts at (r, c)."""
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
    embedded = tower.patch_embed(pixel_values)  # (patches, width) in the input's block-major order
    grid_embeddings = reader.read(pixel_values, {"image_grid_thw": grid}, layers=(-1,)).states[0][0]  # image 0, 8x8
    for row, column in [(0, 0), (0, 1), (1, 0), (1, 1), (2, 5), (7, 7), (5, 2)]:
        block_major = ((row // 2) * 4 + column // 2) * 4 + (row % 2) * 2 + column % 2
        torch.testing.assert_close(grid_embeddings[row * 8 + column], embedded[block_major])


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


def test_a_registered_reader_is_tried_first_and_names_are_unique(family_bases):
    """A new family is one reader class: registered, it is tried before the built-in ones (here for one fresh tower
    only, so the rest of the session is untouched); a second reader of the same name, or a non-reader, is refused."""
    from hive_adapter.model.readers import ViTReader, register_reader

    tower = FAMILIES["gemma3"].build(seed=9).get_encoder(modality="image")  # a tower no session model shares

    @register_reader
    class OneTowerReader(ViTReader):
        name = "test-one-tower"

        @classmethod
        def accepts(cls, candidate, family_config=None):
            return candidate is tower

    assert isinstance(reader_for(tower), OneTowerReader)
    assert reader_for(family_bases("paligemma").get_encoder(modality="image")).name == "vit"
    with pytest.raises(ValueError, match="'test-one-tower' is already registered"):
        register_reader(type("Again", (ViTReader,), {"name": "test-one-tower"}))
    with pytest.raises(TypeError, match="takes a VisionReader subclass"):
        register_reader(object)
