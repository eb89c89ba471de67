"""`generate` across its modes for every connector: greedy, sampling, beams, several sequences per prompt,
the static cache and `inputs_embeds`, each with the cache equal to without it.

transformers' own `GenerationTesterMixin` is not in its source distribution (see tests/transformers_suite.py);
this matrix stands in for it. Prompts are left-padded, of two lengths, with the image marker mid-text.
"""

from __future__ import annotations

import pytest
import torch
from test_generation import left_padded_prompts
from tiny_models import IMAGE_TOKEN, build_text, build_vision, set_gates, vision_inputs

import hive_adapter as hive

CONNECTORS = ("hive", "cascaded", "concat", "deepstack")
NEW_TOKENS = 5

MODES = {
    "greedy": dict(do_sample=False),
    "sampling": dict(do_sample=True, top_k=0, temperature=1.0),
    "beams": dict(do_sample=False, num_beams=3),
    "beams_3_sequences": dict(do_sample=False, num_beams=3, num_return_sequences=3),
    "sampling_2_sequences": dict(do_sample=True, top_k=0, num_return_sequences=2),
}


def model_for(connector: str) -> hive.HiveForConditionalGeneration:
    config = hive.HiveConfig(
        vision_layers=[1, 3], llm_layers=[0, 2], image_token_id=IMAGE_TOKEN, connector=connector, tokens_per_level=4
    )
    model = hive.HiveForConditionalGeneration.from_vision_text(build_vision("clip"), build_text("llama"), config)
    set_gates(model, 0.9)
    model.eval()
    model.generation_config.eos_token_id = None  # random tiny models: never stop early
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="module", params=CONNECTORS)
def model(request):
    return model_for(request.param)


def generate(model, *, seed=0, **settings):
    ids, mask = left_padded_prompts()
    torch.manual_seed(seed)
    return model.generate(
        input_ids=ids, attention_mask=mask, **vision_inputs("clip", 2), max_new_tokens=NEW_TOKENS, **settings
    )


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_gives_the_same_tokens_with_and_without_the_cache(model, mode):
    settings = MODES[mode]
    cached = generate(model, **settings)
    uncached = generate(model, **settings, use_cache=False)
    rows = 2 * settings.get("num_return_sequences", 1)
    assert cached.shape == (rows, 9 + NEW_TOKENS)  # the prompt, then the new tokens
    assert torch.equal(cached, uncached), f"{mode}: cached {cached.tolist()} != uncached {uncached.tolist()}"
    ids, _ = left_padded_prompts()
    assert torch.equal(cached[:, :9], ids.repeat_interleave(rows // 2, 0))


def test_sampling_follows_the_seed(model):
    assert torch.equal(generate(model, seed=3, **MODES["sampling"]), generate(model, seed=3, **MODES["sampling"]))


def test_the_static_cache_gives_the_dynamic_cache_tokens(model):
    assert torch.equal(
        generate(model, do_sample=False, cache_implementation="static"), generate(model, do_sample=False)
    )


def test_inputs_embeds_give_the_new_tokens_of_input_ids(model):
    ids, mask = left_padded_prompts()
    pixels = vision_inputs("clip", 2)
    settings = dict(max_new_tokens=NEW_TOKENS, do_sample=False)
    from_ids = model.generate(input_ids=ids, attention_mask=mask, **pixels, **settings)
    embeds = model.get_input_embeddings()(ids)
    from_embeds = model.generate(inputs_embeds=embeds, attention_mask=mask, **pixels, **settings)
    assert torch.equal(from_embeds, from_ids[:, ids.shape[1] :])
    # input_ids alongside: the markers are read from the ids, the embeddings reach the language model
    both = model.generate(input_ids=ids, inputs_embeds=embeds, attention_mask=mask, **pixels, **settings)
    assert torch.equal(both, from_ids)


def test_each_prompt_generates_as_it_would_alone(model):
    """Batching and left padding change nothing: row b equals prompt b generated on its own."""
    ids, mask = left_padded_prompts()
    pixels = vision_inputs("clip", 2)["pixel_values"]
    batch = model.generate(
        input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=NEW_TOKENS, do_sample=False
    )
    for row in range(2):
        keep = mask[row].bool()
        alone = model.generate(
            input_ids=ids[row : row + 1, keep],
            pixel_values=pixels[row : row + 1],
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
        )
        assert torch.equal(alone[0, -NEW_TOKENS:], batch[row, -NEW_TOKENS:]), row
