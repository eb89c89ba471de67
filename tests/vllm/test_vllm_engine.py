"""A saved HIVE checkpoint served by vLLM's engine (`LLM`, the `vllm.general_plugins` entry point `hive`): greedy
answers equal transformers' `generate` on the same checkpoint, float32 on CPU, one engine for every test here.
"""

from __future__ import annotations

import pytest
from conftest import NEW_TOKENS
from hive_checkpoints import solid_images

QUESTION = "what shape is it ?"


def until_eos(tokens: list[int], eos: int) -> list[int]:
    """The answer up to and including its first EOS (both sides stop there)."""
    return tokens[: tokens.index(eos) + 1] if eos in tokens else list(tokens)


@pytest.fixture(scope="module")
def engine(marker_model, marker_reference):
    """One engine for the module; `marker_reference` is built first (conftest.Reference says why)."""
    from vllm import LLM

    llm = LLM(model=str(marker_model), dtype="float32", enforce_eager=True, max_model_len=128, max_num_seqs=16, seed=0)
    yield llm
    llm.llm_engine.engine_core.shutdown()


def greedy(new_tokens: int = NEW_TOKENS):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=new_tokens, temperature=0.0)


def request(reference, text: str, images: list | None = None) -> dict:
    prompt = {"prompt_token_ids": reference.token_ids(text, images)}
    if images:
        prompt["multi_modal_data"] = {"image": images if len(images) > 1 else images[0]}
    return prompt


def served(engine, prompts: list[dict]) -> list[list[int]]:
    return [list(output.outputs[0].token_ids) for output in engine.generate(prompts, greedy(), use_tqdm=False)]


def check_equal(engine, reference, cases: list[tuple[str, list | None]]) -> list[list[int]]:
    eos = reference.processor.tokenizer.eos_token_id
    answers = served(engine, [request(reference, text, images) for text, images in cases])
    for (text, images), answer in zip(cases, answers, strict=True):
        expected = until_eos(reference.answer(text, images), eos)
        assert until_eos(answer, eos) == expected, f"{text!r} with {len(images or [])} image(s)"
    return answers


def test_one_image_equals_generate(engine, marker_reference):
    check_equal(engine, marker_reference, [(QUESTION, solid_images(1, seed=5))])


def test_text_only_equals_generate(engine, marker_reference):
    check_equal(engine, marker_reference, [(QUESTION, None), ("red circle", None)])


def test_text_before_the_marker_sees_no_image(engine, marker_reference):
    """Marker mode: the image is seen from its marker on; the chat template puts the question first here."""
    reference = marker_reference
    image = solid_images(1, seed=9)
    chat = [{"role": "user", "content": [{"type": "text", "text": "a long question first"}, {"type": "image"}]}]
    text = reference.processor.apply_chat_template(chat, add_generation_prompt=True)
    inputs = reference.processor(text=text, images=image, return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    assert ids.index(reference.model.config.image_token_id) > 5
    expected = reference.model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(ids) :]
    eos = reference.processor.tokenizer.eos_token_id
    (answer,) = served(engine, [{"prompt_token_ids": ids, "multi_modal_data": {"image": image[0]}}])
    assert until_eos(answer, eos) == until_eos(expected.tolist(), eos)


def test_a_long_prompt_equals_generate(engine, marker_reference):
    long_question = " ".join(["what shape and colour is the big red circle ?"] * 9)
    assert len(marker_reference.token_ids(long_question)) > 80
    check_equal(engine, marker_reference, [(long_question, solid_images(1, seed=3))])


def test_sixteen_concurrent_requests_each_equal_their_own_generate(engine, marker_reference):
    images = solid_images(16, seed=11)
    answers = check_equal(engine, marker_reference, [(QUESTION, [image]) for image in images])
    assert len({tuple(answer) for answer in answers}) > 1, "every picture got the same answer: images unseen?"


def test_after_an_aborted_request_answers_still_equal_generate(engine, marker_reference):
    core = engine.llm_engine
    core.add_request("to-abort", request(marker_reference, QUESTION, solid_images(1, seed=21)), greedy(64))
    core.step()  # its prompt (and its image's cross-attention K/V) went through the engine
    core.abort_request(["to-abort"])
    while core.has_unfinished_requests():
        core.step()
    check_equal(engine, marker_reference, [(QUESTION, solid_images(1, seed=22)), (QUESTION, None)])


def test_two_images_in_one_prompt_are_refused_by_name(engine, marker_reference):
    """Not served yet (docs/guides/vllm.md, "Serve at scale: vLLM"): vLLM's encoder-decoder scheduler takes one encoder input
    per request, at the start of the encoder prompt."""
    from vllm.exceptions import VLLMValidationError

    images = solid_images(2, seed=1)
    with pytest.raises(VLLMValidationError, match="At most 1 image"):
        served(engine, [request(marker_reference, QUESTION, images)])


def test_an_image_without_its_marker_is_refused_by_name(engine, marker_reference):
    """transformers' processor refuses it too; served, the image would be seen by the generated tokens only."""
    ids = marker_reference.token_ids(QUESTION)  # no marker in the text
    with pytest.raises(ValueError, match=r"holds 0 image markers '<image>' but 1 images were given"):
        served(engine, [{"prompt_token_ids": ids, "multi_modal_data": {"image": solid_images(1)[0]}}])
    check_equal(engine, marker_reference, [(QUESTION, solid_images(1, seed=2))])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"connector": "concat"}, "connector='concat' .* serve it with vLLM's own LLaVA support"),
        ({"level_mapping": "all"}, "level_mapping='all'"),
        ({"vision_feature_select": "full", "tokens_per_level": None}, "vision_feature_select='full'"),
    ],
)
def test_what_the_plugin_cannot_serve_is_refused_when_vllm_reads_the_config(marker_model, overrides, message):
    """Before any engine process starts (the server test sees it end to end for concat)."""
    import hive_adapter as hive
    from hive_adapter.integrations.vllm.config import HiveServingConfig

    settings = {**hive.HiveConfig.from_pretrained(marker_model).to_dict(), **overrides}
    with pytest.raises(ValueError, match=message):
        HiveServingConfig.from_dict(settings)
    assert HiveServingConfig.from_pretrained(marker_model).is_encoder_decoder


def test_log_probabilities_equal_the_hf_model_within_1e_4(engine, marker_reference):
    """The tolerance behind the equal answers: every step's top-5 log-probabilities from vLLM against the HF model's
    own on the same tokens (float32; measured 2026-12-06: largest difference 4.8e-07 over 4 requests)."""
    import torch
    from vllm import SamplingParams

    reference = marker_reference
    images = solid_images(3, seed=13)
    prompts = [request(reference, QUESTION, [image]) for image in images] + [request(reference, QUESTION)]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, logprobs=5)
    largest = 0.0
    for image, output in zip([*images, None], engine.generate(prompts, params, use_tqdm=False), strict=True):
        completion = output.outputs[0]
        inputs = reference.prompt(QUESTION, [image] if image is not None else None)
        ids = torch.cat([inputs["input_ids"], torch.tensor([completion.token_ids])], dim=1)
        with torch.no_grad():
            logits = reference.model(input_ids=ids, pixel_values=inputs.get("pixel_values")).logits[0]
        hf = torch.log_softmax(logits.float(), dim=-1)[inputs["input_ids"].shape[1] - 1 :]
        for step, alternatives in enumerate(completion.logprobs):
            for token, logprob in alternatives.items():
                largest = max(largest, abs(logprob.logprob - float(hf[step, token])))
    print(f"largest |log p(vLLM) - log p(HF)| over {len(prompts)} requests: {largest:.2e}")
    assert largest < 1e-4
