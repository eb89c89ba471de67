"""A captioning-mode HIVE checkpoint (hive-train's pre-training default: no marker, every token sees the prompt's
one image) served by vLLM's engine: greedy answers equal transformers' `generate`, float32 on CPU."""

from __future__ import annotations

import pytest
from hive_checkpoints import solid_images
from test_vllm_engine import greedy, until_eos

PROMPT = "a picture of"


@pytest.fixture(scope="module")
def engine(caption_model, caption_reference):
    """One engine for the module; `caption_reference` is built first (conftest.Reference says why)."""
    from vllm import LLM

    llm = LLM(model=str(caption_model), dtype="float32", enforce_eager=True, max_model_len=128, max_num_seqs=8,
              seed=0)  # fmt: skip
    yield llm
    llm.llm_engine.engine_core.shutdown()


def test_each_picture_and_no_picture_equal_generate(engine, caption_reference):
    reference = caption_reference
    ids = reference.processor.tokenizer(PROMPT)["input_ids"]
    images = solid_images(6, seed=4)
    prompts = [{"prompt_token_ids": ids, "multi_modal_data": {"image": image}} for image in images]
    prompts.append({"prompt_token_ids": ids})
    outputs = engine.generate(prompts, greedy(), use_tqdm=False)
    eos = reference.processor.tokenizer.eos_token_id
    for image, output in zip([*images, None], outputs, strict=True):
        inputs = reference.processor(text=PROMPT, images=image, return_tensors="pt")
        assert inputs["input_ids"][0].tolist() == ids
        expected = reference.model.generate(**inputs, max_new_tokens=greedy().max_tokens, do_sample=False)
        expected = expected[0, len(ids) :].tolist()
        assert until_eos(list(output.outputs[0].token_ids), eos) == until_eos(expected, eos)
    answers = {tuple(output.outputs[0].token_ids) for output in outputs[:-1]}
    assert len(answers) > 1, "every picture got the same answer: images unseen?"
