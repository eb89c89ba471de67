"""`HiveRuntime`, the one owner of per-prompt state: what outlives a forward and what does not."""

from __future__ import annotations

import gc

import pytest
import torch
from tiny_models import build_text, build_vision, text_ids, vision_inputs

import hive_adapter as hive


def live_tensors() -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


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
    if mode == "training":
        assert model.hive_runtime.context is None
    else:  # kept for a decoding step, without its graph
        assert all(level.grad_fn is None for level in model.hive_runtime.context.levels)


def test_a_forward_without_a_cache_leaves_nothing_and_a_decoding_step_continues_a_prompt(model):
    model.eval()
    with torch.no_grad():
        model(input_ids=text_ids(2, 6), use_cache=False, **vision_inputs("siglip", 2))
        assert model.hive_runtime.context is None
        prompt = model(input_ids=text_ids(2, 6), use_cache=True, **vision_inputs("siglip", 2))
        context = model.hive_runtime.context
        model(input_ids=text_ids(2, 1, seed=9), past_key_values=prompt.past_key_values)
        assert model.hive_runtime.context is context  # the decoding step read the prompt's context


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
