"""Generation: cached == uncached == a full-forward reference loop; vision runs once per prompt; beams."""

import pytest
import torch
from tiny_models import IMAGE_TOKEN, build_llava, build_text, build_vision, set_gates, text_ids, vision_inputs
from transformers import LogitsProcessor, LogitsProcessorList

import hive_adapter as hive

NEW_TOKENS = 6


def full_model(connector="hive", **overrides):
    config = hive.HiveConfig(
        vision_layers=[1, 3],
        llm_layers=[0, 2],
        image_token_id=IMAGE_TOKEN,
        use_ffn=True,
        connector=connector,
        tokens_per_level=4,
        **overrides,
    )
    model = hive.HiveForConditionalGeneration.from_vision_text(build_vision("clip"), build_text("llama"), config)
    return prepared(model)


def adapter_model(connector="hive"):
    config = hive.HiveConfig(vision_layers=[1, 3], llm_layers=[0, 2], connector=connector, tokens_per_level=4)
    return prepared(hive.get_hive_model(build_llava(), config))


def prepared(model):
    set_gates(model, 0.9)
    model.eval()
    model.generation_config.eos_token_id = None  # random tiny models: never stop early
    model.generation_config.pad_token_id = 0
    return model


MODELS = {"full": full_model, "adapter": adapter_model}


def left_padded_prompts():
    """Two prompts of different lengths, left-padded, each with its marker mid-text."""
    long = text_ids(1, 9, marker_at=4, seed=7)[0]
    short = text_ids(1, 6, marker_at=2, seed=8)[0]
    ids = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    ids[0], mask[0] = long, 1
    ids[1, 3:], mask[1, 3:] = short, 1
    return ids, mask


# Never generate the image marker: fed back into a full forward (the references below), a generated marker would be
# read as one more image (the random toy picks it as readily as any token).
NO_MARKER = dict(suppress_tokens=[IMAGE_TOKEN])


@torch.no_grad()
def reference_greedy(model, ids, mask, pixels, steps):
    """Greedy decoding the slow way: a full forward over the whole sequence at every step (the marker suppressed,
    as `NO_MARKER` does in generate)."""
    for _ in range(steps):
        logits = model(input_ids=ids, attention_mask=mask, **pixels).logits[:, -1]
        logits[:, IMAGE_TOKEN] = float("-inf")
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids


@pytest.mark.parametrize("kind", MODELS)
def test_greedy_with_cache_equals_without_and_the_reference(kind):
    model = MODELS[kind]()
    ids, mask = left_padded_prompts()
    pixels = vision_inputs("clip", 2)
    cached = model.generate(
        input_ids=ids, attention_mask=mask, **pixels, max_new_tokens=NEW_TOKENS, do_sample=False, **NO_MARKER
    )
    uncached = model.generate(
        input_ids=ids, attention_mask=mask, **pixels, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=False,
        **NO_MARKER,
    )  # fmt: skip
    assert torch.equal(cached, uncached)
    if kind == "full":  # the adapter's base is llava-hf, whose forward needs the HIVE wrapper for images
        assert torch.equal(cached, reference_greedy(model, ids, mask, pixels, NEW_TOKENS))
    # the image matters: without it the continuation differs
    text_only = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, **NO_MARKER
    )
    assert not torch.equal(cached, text_only)


@pytest.mark.parametrize("kind", MODELS)
def test_left_padded_batch_matches_each_prompt_alone(kind):
    model = MODELS[kind]()
    ids, mask = left_padded_prompts()
    pixels = vision_inputs("clip", 2)["pixel_values"]
    batched = model.generate(
        input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=NEW_TOKENS, do_sample=False
    )
    for row, start in ((0, 0), (1, 3)):
        alone = model.generate(
            input_ids=ids[row : row + 1, start:],
            pixel_values=pixels[row : row + 1],
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
        )
        assert torch.equal(batched[row, -NEW_TOKENS:], alone[0, -NEW_TOKENS:]), row


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("use_cache", [True, False])
def test_vision_encoder_and_kv_projections_run_once_per_prompt(kind, use_cache):
    model = MODELS[kind]()
    calls = {"tower": 0, "k_proj": 0}
    tower = model.hive_vision.tower
    handles = [tower.register_forward_hook(lambda *a: calls.__setitem__("tower", calls["tower"] + 1))]
    blocks = [m for m in model.modules() if isinstance(m, hive.HiveCrossAttention)]
    for block in blocks:
        handles.append(
            block.hive_k_proj.register_forward_hook(lambda *a: calls.__setitem__("k_proj", calls["k_proj"] + 1))
        )
    ids = text_ids(2, 8, marker_at=2)
    model.generate(
        input_ids=ids, **vision_inputs("clip", 2), max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=use_cache
    )
    for handle in handles:
        handle.remove()
    assert calls == {"tower": 1, "k_proj": len(blocks)}


@pytest.mark.parametrize("kind", MODELS)
def test_beam_search_scores_match_a_full_forward(kind):
    model = MODELS[kind]()
    ids = text_ids(2, 8, marker_at=3)
    pixels = vision_inputs("clip", 2)
    out = model.generate(
        input_ids=ids,
        **pixels,
        max_new_tokens=NEW_TOKENS,
        num_beams=3,
        num_return_sequences=2,
        do_sample=False,
        length_penalty=0.0,
        output_scores=True,
        return_dict_in_generate=True,
        **NO_MARKER,  # the scores stay log-softmax over the whole vocabulary, the marker's set to -inf
    )
    sequences = out.sequences  # (batch*2, prompt+new)
    assert sequences.shape == (4, 8 + NEW_TOKENS)
    pixel_rows = {k: v.repeat_interleave(2, dim=0) for k, v in pixels.items()}
    with torch.no_grad():
        logits = model(input_ids=sequences, **pixel_rows).logits
    logprobs = torch.log_softmax(logits[:, 7:-1].float(), -1).gather(-1, sequences[:, 8:, None]).squeeze(-1)
    torch.testing.assert_close(out.sequences_scores, logprobs.sum(-1), atol=1e-4, rtol=1e-4)
    assert out.sequences_scores[0] >= out.sequences_scores[1]  # best beam first


def test_concat_generation_matches_its_reference_loop():
    model = full_model(connector="concat")
    ids = text_ids(1, 7, marker_at=3)
    pixels = vision_inputs("clip", 1)
    generated = model.generate(input_ids=ids, **pixels, max_new_tokens=NEW_TOKENS, do_sample=False, **NO_MARKER)
    assert torch.equal(generated, reference_greedy(model, ids, torch.ones_like(ids), pixels, NEW_TOKENS))


class ForceMarkerFirst(LogitsProcessor):
    """Make the first generated token the image marker."""

    def __init__(self, prompt_length):
        self.prompt_length = prompt_length

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] == self.prompt_length:
            scores = torch.full_like(scores, -float("inf"))
            scores[:, IMAGE_TOKEN] = 0.0
        return scores


def test_a_generated_marker_token_is_text():
    """If the model emits the marker id, no new image appears: the context stays the prompt's,
    with and without the cache alike (the marker count is not re-checked against pixel_values)."""
    model = full_model()
    ids = text_ids(1, 6, marker_at=2)
    pixels = vision_inputs("clip", 1)
    runs = [
        model.generate(
            input_ids=ids,
            **pixels,
            max_new_tokens=4,
            do_sample=False,
            use_cache=use_cache,
            logits_processor=LogitsProcessorList([ForceMarkerFirst(6)]),
        )
        for use_cache in (True, False)
    ]
    assert runs[0][0, 6] == IMAGE_TOKEN
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("kind", MODELS)
def test_a_training_step_does_not_keep_its_vision_context_but_a_cached_prompt_does(kind):
    """The context of a training forward (media tensors and their autograd graph) is gone once the forward
    returns, instead of living on through backward, the optimizer step and the next batch's vision forward;
    a forward that returns a cache keeps its context for the decoding steps that follow."""
    model = MODELS[kind]()
    runtime = model.hive_runtime
    ids, mask = left_padded_prompts()
    pixels = vision_inputs("clip", 2)

    model.train()
    loss = model(input_ids=ids, attention_mask=mask, labels=ids, **pixels).loss
    assert runtime.context is None
    loss.backward()  # backward needs nothing from the runtime
    assert all(p.grad is not None for n, p in model.named_parameters() if "hive_" in n and p.requires_grad)

    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, **pixels)
        assert runtime.context is None  # nothing is current between calls: the cache carries the prompt
        assert runtime.prompt_for_call(past_key_values=out.past_key_values, has_images=False) is not None
        step = out.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        model(input_ids=step, attention_mask=mask, past_key_values=out.past_key_values, use_cache=True)
        model(input_ids=ids, attention_mask=mask[:, :-1], use_cache=False, **pixels)
    assert runtime.context is None  # nothing can continue from a forward without a cache
