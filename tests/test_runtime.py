"""`HiveRuntime`, the one owner of per-prompt state: what outlives a forward and what does not."""

from __future__ import annotations

import gc

import pytest
import torch
from tiny_models import build_text, build_vision, text_ids, vision_inputs

import hive_adapter as hive
from hive_adapter.model.context import HiveVisionContext


def live_tensors() -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


def live_contexts() -> int:
    """Vision contexts anything still holds (the runtime, a cache's prompt, a test's variable)."""
    gc.collect()
    return sum(1 for obj in gc.get_objects() if isinstance(obj, HiveVisionContext))


@pytest.fixture
def model():
    config = hive.HiveConfig(vision_layers=[1, 3], llm_layers=[0, 2])
    return hive.HiveForConditionalGeneration.from_vision_text(build_vision("siglip"), build_text("llama"), config)


@pytest.mark.parametrize("mode", ["eval-with-gradients", "training"])
def test_repeated_forwards_keep_no_memory_of_earlier_prompts(model, mode):
    """The number of live tensors stays flat over repeated forwards whose outputs are dropped: no prompt's context,
    cached K/V or autograd graph accumulates in the runtime (eval mode with gradients on kept the last graph)."""
    model.train(mode == "training")
    counts = []
    for call in range(6):
        output = model(
            input_ids=text_ids(2, 6, seed=call), labels=text_ids(2, 6, seed=call), **vision_inputs("siglip", 2)
        )
        output.loss.backward()
        model.zero_grad(set_to_none=True)
        del output
        counts.append(live_tensors())
    assert max(counts[2:]) <= counts[1], counts
    assert model.hive_runtime.context is None


def test_a_forward_without_a_cache_leaves_nothing_and_a_decoding_step_continues_a_prompt(model):
    model.eval()
    runtime = model.hive_runtime
    with torch.no_grad():
        model(input_ids=text_ids(2, 6), use_cache=False, **vision_inputs("siglip", 2))
        assert runtime.context is None and live_contexts() == 0
        prompt = model(input_ids=text_ids(2, 6), use_cache=True, **vision_inputs("siglip", 2))
        assert runtime.context is None and live_contexts() == 1  # carried by the cache alone
        carried = runtime.prompt_for_call(past_key_values=prompt.past_key_values, has_images=False)
        assert runtime.cached_vision_bytes(prompt.past_key_values) > 0  # each block's K/V, computed once
        seen = []
        handle = model.language_model.model.layers[0].register_forward_pre_hook(
            lambda *args: seen.append(runtime.context)
        )
        model(input_ids=text_ids(2, 1, seed=9), past_key_values=prompt.past_key_values)
        handle.remove()
        assert len(seen) == 1 and seen[0] is carried.context  # the decoding step read the prompt's context


def test_generate_pins_the_prompt_and_clears_it_afterwards(model):
    model.eval()
    model.generate(input_ids=text_ids(2, 6), max_new_tokens=3, do_sample=False, **vision_inputs("siglip", 2))
    assert model.hive_runtime.context is None and not model.hive_runtime.pinned
    assert model.hive_runtime.cached_vision_bytes() == 0


def test_a_decoding_step_before_any_prompt_is_named(model):
    model.eval()
    with torch.no_grad():
        prompt = model(input_ids=text_ids(1, 4), use_cache=True, **vision_inputs("siglip", 1))
        model.hive_runtime.clear()
        with pytest.raises(RuntimeError, match="a decoding step .* arrived before any prompt"):
            model(input_ids=text_ids(1, 1), past_key_values=prompt.past_key_values)


def test_eval_forwards_with_gradients_that_return_a_cache_keep_nothing_once_their_output_is_dropped(model):
    """model.eval() without torch.no_grad(), use_cache=True, the output dropped after each call: no context (nor
    its levels) outlives the output. The prompt's context lives as long as the cache that can continue it."""
    model.eval()
    with torch.no_grad():  # one forward that keeps nothing, so lazily built buffers exist before counting
        model(input_ids=text_ids(2, 6), use_cache=False, **vision_inputs("siglip", 2))
    baseline = live_tensors()
    counts = []
    for call in range(4):
        output = model(input_ids=text_ids(2, 6, seed=call), use_cache=True, **vision_inputs("siglip", 2))
        assert output.logits.requires_grad and output.past_key_values is not None
        del output
        counts.append(live_tensors())
        assert live_contexts() == 0, f"call {call}: a vision context outlived its output"
    assert max(counts) <= baseline, (baseline, counts)


@pytest.mark.parametrize("gradients", [True, False])
def test_a_prompt_lives_as_long_as_its_cache(model, gradients):
    """Decoding steps continue the prompt whose cache they pass, for as long as that cache lives; two prompts'
    caches continue each their own prompt; dropping a cache releases its prompt."""
    model.eval()
    with torch.no_grad():
        for block in model.hive_blocks.values():
            block.hive_attn_gate.fill_(1.0)  # the images change the text
    with torch.set_grad_enabled(gradients):
        first = model(input_ids=text_ids(2, 6), use_cache=True, **vision_inputs("siglip", 2, seed=1))
        second = model(input_ids=text_ids(2, 6), use_cache=True, **vision_inputs("siglip", 2, seed=2))
        assert model.hive_runtime.context is None  # nothing is current between calls
        steps = {}
        for name, out in (("first", first), ("second", second)):
            steps[name] = model(input_ids=text_ids(2, 1, seed=9), past_key_values=out.past_key_values).logits
        del first, second, out
    assert not torch.equal(steps["first"], steps["second"])  # each step read its own prompt's images
    assert live_contexts() == 0
    with torch.no_grad():  # the same as one prompt alone
        alone = model(input_ids=text_ids(2, 6), use_cache=True, **vision_inputs("siglip", 2, seed=1))
        step = model(input_ids=text_ids(2, 1, seed=9), past_key_values=alone.past_key_values).logits
    torch.testing.assert_close(step, steps["first"].detach())


class Boom(Exception):
    pass


def raise_boom(*args):
    raise Boom


@pytest.mark.parametrize("mode", ["train", "eval-with-gradients", "eval-no-grad"])
def test_an_exception_inside_a_forward_releases_its_context(model, mode):
    model.train(mode == "train")
    handle = model.language_model.model.layers[1].register_forward_hook(raise_boom)
    try:
        with torch.set_grad_enabled(mode != "eval-no-grad"), pytest.raises(Boom):
            model(input_ids=text_ids(2, 6), use_cache=mode != "train", **vision_inputs("siglip", 2))
    finally:
        handle.remove()
    assert model.hive_runtime.context is None
    assert live_contexts() == 0
    output = model(input_ids=text_ids(2, 6), **vision_inputs("siglip", 2))  # the next call runs as usual
    assert output.logits.shape[:2] == (2, 6)


def test_generate_keeps_one_context_for_every_step_and_releases_it_even_when_a_step_raises(model):
    from transformers import LogitsProcessor, LogitsProcessorList

    seen = []

    class Watch(LogitsProcessor):
        def __init__(self, fail_at=None):
            self.fail_at = fail_at

        def __call__(self, input_ids, scores):
            seen.append(model.hive_runtime.context)
            if len(seen) == self.fail_at:
                raise Boom
            return scores

    model.eval()
    model.generate(input_ids=text_ids(2, 6), max_new_tokens=4, do_sample=False,
                   logits_processor=LogitsProcessorList([Watch()]), **vision_inputs("siglip", 2))  # fmt: skip
    assert len(seen) == 4 and seen[0] is not None and all(context is seen[0] for context in seen)
    seen.clear()
    assert live_contexts() == 0
    with pytest.raises(Boom):
        model.generate(input_ids=text_ids(2, 6), max_new_tokens=4, do_sample=False,
                       logits_processor=LogitsProcessorList([Watch(fail_at=2)]), **vision_inputs("siglip", 2))  # fmt: skip
    seen.clear()
    assert model.hive_runtime.context is None and live_contexts() == 0


# ---------------------------------------------------------------- the runtime on its own (no model)
def tiny_context(seed: int = 0) -> HiveVisionContext:
    from hive_adapter.model.layout import one_image_per_sample

    level = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(seed), requires_grad=True)
    slots = one_image_per_sample(2, 2, torch.device("cpu"))
    return HiveVisionContext.from_images([level * 1.0], None, slots, prompt_length=5, media_attention="previous")


def legacy_cache(length: int) -> tuple:
    return ((torch.zeros(2, 1, length, 4), torch.zeros(2, 1, length, 4)),)


@pytest.mark.parametrize("form", ["Cache", "legacy tuple"])
def test_a_returned_cache_carries_its_prompt_until_it_is_dropped(form):
    from transformers import DynamicCache

    runtime = hive.HiveRuntime()
    cache = DynamicCache() if form == "Cache" else legacy_cache(5)
    if form == "Cache":
        cache.update(torch.zeros(2, 1, 5, 4), torch.zeros(2, 1, 5, 4), 0)
    with torch.no_grad(), runtime.forward_scope(tiny_context()) as context:
        assert runtime.context is context
        runtime.end_stack(training_step=False, returned_cache=cache)
    assert runtime.context is None
    prompt = runtime.prompt_for_call(past_key_values=cache, has_images=False)
    assert prompt.context is context
    assert runtime.prompt_for_call(past_key_values=cache, has_images=True) is None  # images: a new prompt
    del prompt, context, cache
    assert live_contexts() == 0 and not runtime._continued


def test_a_training_step_hands_nothing_on_and_gradients_on_hand_on_a_detached_context():
    runtime = hive.HiveRuntime()
    training, evaluation = legacy_cache(5), legacy_cache(5)
    with runtime.forward_scope(tiny_context()):
        runtime.end_stack(training_step=True, returned_cache=training)
    with runtime.forward_scope(tiny_context()) as context:
        runtime.end_stack(training_step=False, returned_cache=evaluation)
    with pytest.raises(RuntimeError, match="arrived before any prompt"):
        runtime.prompt_for_call(past_key_values=training, has_images=False)
    carried = runtime.prompt_for_call(past_key_values=evaluation, has_images=False).context
    assert carried is not context and carried.levels[0].grad_fn is None
    assert torch.equal(carried.levels[0], context.levels[0].detach())


def test_scopes_release_on_exceptions_and_a_pinned_prompt_outlives_inner_forwards():
    runtime = hive.HiveRuntime()
    with pytest.raises(KeyError), runtime.forward_scope(tiny_context()):
        raise KeyError
    assert runtime.context is None
    with runtime.pinned_to(tiny_context()) as pinned:
        assert runtime.prompt_for_call(past_key_values=legacy_cache(5), has_images=True).context is pinned
        with runtime.forward_scope(tiny_context(1)):  # a decoding step inside generate keeps the pinned prompt
            assert runtime.context is pinned
        assert runtime.context is pinned and runtime.pinned
    assert runtime.context is None and not runtime.pinned
    runtime.open_forward(tiny_context())  # LLaVA's prepare_inputs: closed at the end of the decoder stack
    assert runtime.context is not None
    runtime.end_stack(training_step=False, returned_cache=None)
    assert runtime.context is None
