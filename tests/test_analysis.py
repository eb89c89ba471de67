"""Analysis tools on tiny saved checkpoints: gradient flow, cross-attention maps, caption alignment, CLIs."""

import json
import math
import random

import numpy
import pytest
import torch
from hive_checkpoints import save_hive_checkpoint, save_llava_hf_with_adapter, toy_models
from PIL import Image

from hive_adapter.analysis import (
    GradientFlow,
    aligned_logits,
    attention_entropy,
    caption_accuracy,
    caption_batch,
    cross_attention_maps,
    gradient_flow,
    image_reading,
    token_groups,
)
from hive_adapter.analysis.captioning import per_sample_caption_loss
from hive_adapter.analysis.cli import main as analyze
from hive_adapter.data.collator import HiveCaptionCollator
from hive_adapter.data.synthetic import ATTRIBUTE_WORDS, PROMPT, SyntheticShapes
from hive_adapter.model.loading import load_hive

SHAPES = SyntheticShapes(8, seed=7, image_size=32)
STEPS = 120


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return toy_models(tmp_path_factory.mktemp("toy"))


@pytest.fixture(scope="module")
def checkpoints(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    return {
        connector: save_hive_checkpoint(models, root / connector, connector=connector)
        for connector in ("hive", "cascaded", "concat")
    }


def pairs(indices):
    return [SHAPES.image(i) for i in indices], [SHAPES.sample(i).caption for i in indices]


def layer_outputs_by_hooks(model, batch):
    """Reference: d loss / d (each encoder layer's output), taken with hooks on the layer modules."""
    outputs = []

    def keep(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden.retain_grad()
        outputs.append(hidden)

    tower = model.vision_model
    layers = getattr(tower, "vision_model", tower).encoder.layers
    handles = [layer.register_forward_hook(keep) for layer in layers]
    pixels = batch["pixel_values"].clone().requires_grad_(True)
    model(**{**batch, "pixel_values": pixels}).loss.backward()
    for handle in handles:
        handle.remove()
    model.zero_grad(set_to_none=True)
    return [hidden.grad for hidden in outputs]


@pytest.mark.parametrize("connector", ["hive", "cascaded", "concat"])
def test_gradient_maps_are_the_gradients_at_each_layer(checkpoints, connector):
    loaded = load_hive(checkpoints[connector])
    batch = caption_batch(loaded, *pairs([0]), prompt=PROMPT)
    flow = gradient_flow(loaded.model, batch)
    assert flow.patch_maps.shape == (1, 4, 4, 4)  # (images, layers, grid 32/8, grid)
    assert all(p.grad is None for p in loaded.model.parameters())  # the model's own gradients are untouched
    reference = layer_outputs_by_hooks(loaded.model, batch)
    for layer, grad in enumerate(reference):
        # the model's loss is the mean over the batch's caption tokens: the same as the per-sample mean here
        torch.testing.assert_close(flow.patch_maps[0, layer], grad[0].norm(dim=-1).view(4, 4), rtol=1e-4, atol=1e-9)
    assert (flow.layer_norms > 0).all()


@pytest.mark.parametrize("connector", ["hive", "concat"])
def test_layers_above_the_deepest_level_get_exactly_no_gradient(models, tmp_path, connector):
    path = save_hive_checkpoint(models, tmp_path / connector, connector=connector, vision_layers=[0, 1])
    loaded = load_hive(path)
    flow = gradient_flow(loaded.model, caption_batch(loaded, *pairs([1]), prompt=PROMPT))
    norms = flow.layer_norms[0]
    assert norms[0] > 0 and norms[1] > 0
    assert norms[2] == 0 and norms[3] == 0  # layers 3 and 4 feed nothing


def test_gradient_flow_of_a_batch_is_each_image_on_its_own(checkpoints):
    loaded = load_hive(checkpoints["hive"])
    together = gradient_flow(loaded.model, caption_batch(loaded, *pairs([2, 3]), prompt=PROMPT))
    for row, index in enumerate([2, 3]):
        alone = gradient_flow(loaded.model, caption_batch(loaded, *pairs([index]), prompt=PROMPT))
        torch.testing.assert_close(together.patch_maps[row], alone.patch_maps[0], rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(together.losses[row], alone.losses[0])


def test_object_share_counts_the_gradient_on_the_masked_patches():
    maps = torch.zeros(1, 2, 4, 4)
    maps[0, 0, 1, 2] = 3.0  # layer 1: everything on one patch
    maps[0, 1] = 1.0  # layer 2: spread evenly
    flow = GradientFlow(patch_maps=maps, layer_norms=maps.flatten(2).norm(dim=-1), losses=torch.zeros(1))
    mask = torch.zeros(1, 32, 32)
    mask[0, 8:16, 16:24] = 1  # exactly that patch
    share = flow.object_share(mask)
    torch.testing.assert_close(share, torch.tensor([[1.0, 1 / 16]]))


def test_gradient_maps_fall_on_the_object_once_the_model_learns_to_caption(models, tmp_path):
    """120 small captioning steps: the first layer's gradient moves onto the captioned shape.

    HIVE's weights start at std 0.1, about 1/sqrt(width) for these 32/64-wide layers; the default 0.02 is
    that scale for LM widths near 2,048 and leaves a toy model's attention nearly uniform for hundreds of steps.
    """
    loaded = load_hive(save_hive_checkpoint(models, tmp_path / "hive", connector="hive", initializer_range=0.1))
    model = loaded.model
    held_out = SyntheticShapes(16, seed=99, image_size=32)
    probe = caption_batch(
        loaded, [held_out.image(i) for i in range(16)], [held_out.sample(i).caption for i in range(16)], prompt=PROMPT
    )
    masks = torch.stack(
        [torch.from_numpy(numpy.array(held_out.object_mask(i), dtype=numpy.float32) / 255) for i in range(16)]
    )
    before = gradient_flow(model, probe).object_share(masks).mean(0)

    data = SyntheticShapes(64, seed=3, image_size=32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    model.train()
    for step in range(STEPS):
        indices = random.Random(step).sample(range(64), 16)
        batch = caption_batch(
            loaded, [data.image(i) for i in indices], [data.sample(i).caption for i in indices], prompt=PROMPT
        )
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = gradient_flow(model.eval(), probe).object_share(masks).mean(0)
    area = masks.mean()  # an even spread would put this share on the object
    assert after[0] > 1.5 * area and after[0] > before[0] + 0.05, (before.tolist(), after.tolist(), area.item())


def test_attention_maps_are_distributions_over_the_pooled_grid(checkpoints):
    loaded = load_hive(checkpoints["hive"])
    batch = caption_batch(loaded, *pairs([0]), prompt=PROMPT)
    maps = cross_attention_maps(loaded.model, batch)
    text = batch["input_ids"].shape[1]
    assert maps.maps.shape == (2, text, 2, 2)  # 2 HIVE layers, 4 tokens per level on a 2x2 grid
    torch.testing.assert_close(maps.maps.sum((-1, -2)), torch.ones(2, text))
    assert maps.llm_layers == [0, 1]
    assert maps.predicting(1).shape == (2, 2, 2)
    with pytest.raises(ValueError, match="position 0"):
        maps.predicting(0)
    # the recorded pass computes the same logits as a plain forward
    assert loaded.model.hive_runtime.context is None


def test_attention_maps_with_all_levels_sum_over_levels(models, tmp_path):
    loaded = load_hive(save_hive_checkpoint(models, tmp_path / "all", level_mapping="all"))
    maps = cross_attention_maps(loaded.model, caption_batch(loaded, *pairs([0])))
    torch.testing.assert_close(maps.maps.sum((-1, -2)), torch.ones(maps.maps.shape[:2]))


def test_attention_maps_refuse_concat_and_batches(checkpoints):
    loaded = load_hive(checkpoints["concat"])
    with pytest.raises(ValueError, match="concat"):
        cross_attention_maps(loaded.model, caption_batch(loaded, *pairs([0])))
    loaded = load_hive(checkpoints["hive"])
    with pytest.raises(ValueError, match="one image"):
        cross_attention_maps(loaded.model, caption_batch(loaded, *pairs([0, 1])))


def test_concat_logits_are_aligned_with_the_text_around_a_marker(models, tmp_path):
    from transformers import AutoTokenizer

    marker = AutoTokenizer.from_pretrained(models[1]).convert_tokens_to_ids("<image>")
    loaded = load_hive(save_hive_checkpoint(models, tmp_path / "concat", connector="concat", image_token_id=marker))
    assert loaded.image_token == "<image>"
    batch = caption_batch(loaded, *pairs([0, 1]), prompt=PROMPT)
    ids = batch["input_ids"]
    column = (ids[0] == marker).nonzero().item()  # after BOS
    with torch.no_grad():
        raw = loaded.model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        aligned = aligned_logits(loaded.model, batch)
    assert aligned.shape[:2] == ids.shape
    torch.testing.assert_close(aligned[:, :column], raw[:, :column])
    torch.testing.assert_close(aligned[:, column + 1 :], raw[:, column + 4 : column + 4 + ids.shape[1] - column - 1])


def test_caption_accuracy_is_the_same_measure_for_every_connector(checkpoints):
    for connector, path in checkpoints.items():
        loaded = load_hive(path)
        batch = caption_batch(loaded, *pairs(range(4)), prompt=PROMPT)
        predicted = aligned_logits(loaded.model, batch)[:, :-1].argmax(-1)
        scored = batch["labels"][:, 1:] != -100
        expected = (predicted == batch["labels"][:, 1:])[scored].float().mean().item()
        assert caption_accuracy(loaded.model, [batch]) == pytest.approx(expected), connector


def test_token_groups_name_the_content_words_and_refuse_a_word_in_two_groups(checkpoints):
    tokenizer = load_hive(checkpoints["hive"]).tokenizer
    groups = token_groups(tokenizer, ATTRIBUTE_WORDS)
    assert {tokenizer.convert_ids_to_tokens(t): g for t, g in groups.items()} == {
        word: group for group, words in ATTRIBUTE_WORDS.items() for word in words
    }
    with pytest.raises(ValueError, match="'red'.* in both 'colour' and 'shape'"):
        token_groups(tokenizer, {"colour": ["red"], "shape": ["red"]})


@pytest.mark.parametrize("connector", ["hive", "concat"])
def test_image_reading_scores_every_caption_token_once_and_only_the_image_differs(checkpoints, connector):
    loaded = load_hive(checkpoints[connector])
    collator = HiveCaptionCollator(loaded.tokenizer, loaded.image_processor)
    groups = token_groups(loaded.tokenizer, ATTRIBUTE_WORDS)
    reading = image_reading(loaded.model, collator, SHAPES, groups, batch_size=3)
    # "a {colour} {texture} {shape} in the {top left}" + end of text: 5 content and 4 structural tokens
    # (the centre position is one word)
    positions = sum(len(SHAPES.sample(i).position.split()) for i in range(len(SHAPES)))
    assert reading.tokens["content"] == 3 * len(SHAPES) + positions and reading.tokens["position"] == positions
    assert reading.tokens["structural"] == 4 * len(SHAPES)
    assert reading.tokens["all"] == reading.tokens["content"] + reading.tokens["structural"]
    expected = caption_accuracy(loaded.model, [caption_batch(loaded, *pairs(range(len(SHAPES))), prompt=PROMPT)])
    assert reading.real["all"] == pytest.approx(expected)
    same_picture = [{**SHAPES[i], "image": SHAPES.image(0)} for i in range(len(SHAPES))]
    one_image = image_reading(loaded.model, collator, same_picture, groups)
    assert one_image.real == one_image.swapped  # the control changes the image and nothing else


def test_image_reading_tells_a_model_that_reads_the_colour_from_its_control(models, tmp_path):
    """200 steps on "a <colour>" captions: the colour comes from the picture, and another picture undoes it."""
    loaded = load_hive(save_hive_checkpoint(models, tmp_path / "hive", connector="hive"))
    model, collator = loaded.model, HiveCaptionCollator(loaded.tokenizer, loaded.image_processor)
    data = SyntheticShapes(512, seed=3, image_size=32, attributes=("colour",))
    batches = [collator([data[i] for i in range(start, start + 32)]) for start in range(0, len(data), 32)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for step in range(200):
        model(**batches[step % len(batches)]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    held_out = SyntheticShapes(96, seed=99, image_size=32, attributes=("colour",))
    reading = image_reading(model, collator, held_out, token_groups(loaded.tokenizer, ATTRIBUTE_WORDS))
    # chance is 1/8 of the colours: 200 steps read most of them (72% at HIVE's N(0, 0.02) init), another picture
    # undoes it
    assert reading.real["colour"] >= 0.6 and reading.swapped["colour"] <= 0.3, reading.describe()
    assert reading.image_dependent("content") >= 0.4 and reading.real["structural"] == 1.0
    assert reading.tokens["shape"] == 0 and "content" in reading.describe()


def test_gradients_relative_to_the_text_input_are_the_gradient_at_the_lm_input_embeddings(checkpoints):
    loaded = load_hive(checkpoints["hive"])
    model = loaded.model
    batch = caption_batch(loaded, *pairs([0, 1]), prompt=PROMPT)
    flow = gradient_flow(model, batch)
    embeddings = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "input_ids")}
    logits = model(inputs_embeds=embeddings, **inputs).logits
    per_sample_caption_loss(logits, batch["labels"]).sum().backward()
    reference = (embeddings.grad * batch["attention_mask"][..., None]).flatten(1).norm(dim=-1)
    torch.testing.assert_close(flow.text_input_norms, reference, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(flow.relative_norms, flow.layer_norms / reference[:, None], rtol=1e-4, atol=1e-9)


def test_attention_entropy_is_ln_keys_for_uniform_attention_and_lower_when_selective(checkpoints, models, tmp_path):
    loaded = load_hive(checkpoints["hive"])
    batch = caption_batch(loaded, *pairs([0, 1, 2]), prompt=PROMPT)
    entropy = attention_entropy(loaded.model, batch)
    assert entropy.shape == (2,) and (entropy > 0).all() and (entropy < math.log(4)).all()  # 4 keys per image
    with torch.no_grad():
        for name, param in loaded.model.named_parameters():
            if name.endswith("hive_k_proj.weight"):
                param.zero_()  # every key the same: nothing to choose between
    torch.testing.assert_close(attention_entropy(loaded.model, batch), torch.full((2,), math.log(4)))
    with pytest.raises(ValueError, match="concat"):
        attention_entropy(load_hive(checkpoints["concat"]).model, batch)


def test_hive_analyze_gradients_and_attention_write_png_and_json(checkpoints, tmp_path, capsys):
    image = tmp_path / "shape.png"
    SHAPES.image(0).save(image)
    caption = SHAPES.sample(0).caption

    def run(command, connector="hive", *extra):
        analyze([command, str(checkpoints[connector]), str(image), caption, *map(str, extra)])

    run("gradients", "hive", "--prompt", PROMPT, "--output", tmp_path / "g.png")
    report = json.loads((tmp_path / "g.json").read_text())
    assert [entry["layer"] for entry in report["layers"]] == [1, 2, 3, 4]
    assert all(entry["grad_norm"] > 0 for entry in report["layers"])
    assert Image.open(tmp_path / "g.png").size[0] > Image.open(tmp_path / "g.png").size[1]  # one row of panels
    assert "layer   1" in capsys.readouterr().out

    word = caption.split()[2]
    run("attention", "hive", "--token", word, "--output", tmp_path / "a.png")
    attention = json.loads((tmp_path / "a.json").read_text())
    assert [entry["token"] for entry in attention["tokens"]] == [word]
    assert len(attention["tokens"][0]["maps"]) == 2  # one map per HIVE layer
    assert (tmp_path / "a.png").stat().st_size > 1000

    with pytest.raises(SystemExit, match="'zebra' is not a token"):
        run("attention", "hive", "--token", "zebra", "--output", tmp_path / "b.png")
    with pytest.raises(SystemExit, match="concat"):
        run("attention", "concat", "--output", tmp_path / "c.png")
    with pytest.raises(SystemExit, match="no-such.png does not exist"):
        analyze(["gradients", str(checkpoints["hive"]), str(tmp_path / "no-such.png"), caption])


def test_analysis_of_a_hive_adapter_on_a_llava_hf_base(tmp_path):
    base, adapter = save_llava_hf_with_adapter(tmp_path)
    loaded = load_hive(base, adapter=adapter)
    marker_id = loaded.tokenizer.convert_tokens_to_ids("<image>")
    batch = caption_batch(loaded, *pairs([0]), prompt=PROMPT)
    assert (batch["input_ids"][0] == marker_id).sum() == 1  # one marker, not one token per patch
    flow = gradient_flow(loaded.model, batch)
    assert flow.patch_maps.shape == (1, 4, 4, 4) and (flow.layer_norms[0] > 0).all()  # CLIP's CLS token dropped
    maps = cross_attention_maps(loaded.model, batch)
    marker = (batch["input_ids"][0] == marker_id).nonzero().item()
    assert maps.maps[:, :marker].abs().max() == 0  # text before the image sees nothing
    torch.testing.assert_close(maps.maps[:, marker:].sum((-1, -2)), torch.ones(2, maps.maps.shape[1] - marker))
