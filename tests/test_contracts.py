"""The Hugging Face contracts a HIVE model must keep: every construction path initialises every HIVE tensor,
the language model keeps its own parameter names (plain LM checkpoints, tensor-parallel plans and PEFT's
tuner detection depend on them), older checkpoints still load, `inputs_embeds` works, and the fp32 list
names what exists."""

from __future__ import annotations

import math
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import IMAGE_TOKEN, build_llava, build_text, build_vision, set_gates, text_ids, vision_inputs
from transformers import AutoModel, LlamaForCausalLM

import hive_adapter as hive
from hive_adapter.model.adapter_model import ADAPTER_WEIGHTS_NAME


def expected_std(tensor: torch.Tensor) -> float:
    """The default start (`initializer_range=None`): N(0, 1/fan_in) for a linear weight (its input width is the
    last dimension), N(0, 1/width) for the level embeddings."""
    return 1.0 / math.sqrt(tensor.shape[-1])


def compose(vision="siglip", text="llama", **overrides) -> hive.HiveForConditionalGeneration:
    settings = {"vision_layers": [1, 3], "llm_layers": [0, 2], **overrides}
    return hive.HiveForConditionalGeneration.from_vision_text(
        build_vision(vision), build_text(text), hive.HiveConfig(**settings)
    ).eval()


def hive_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.detach() for name, param in model.named_parameters() if "hive_" in name}


def assert_freshly_initialised(model: torch.nn.Module, *, gate_init: float = 0.0, std: float | None = None) -> None:
    """Gates at `gate_init`, norms at (1, 0), every HIVE linear weight ~ N(0, std) with zero bias; with `std`
    None, the default: each weight divided by its own expected std (`expected_std`) is ~ N(0, 1)."""
    tensors = hive_tensors(model)
    assert tensors, "the model has no HIVE parameters"
    weights = []
    for name, tensor in tensors.items():
        assert torch.isfinite(tensor).all(), f"{name} holds non-finite values"
        if name.endswith(("hive_attn_gate", "hive_ffn_gate")):
            assert torch.all(tensor == gate_init), f"{name} = {tensor.tolist()}, expected gate_init={gate_init}"
        elif re.search(r"hive_(attn|media|ffn)_norm\.weight$", name):
            assert torch.all(tensor == 1), name
        elif name.endswith(".bias"):
            assert torch.all(tensor == 0), f"{name} is not zero"
        elif name.endswith(".weight") or name.endswith("level_embedding"):
            weights.append((tensor / (expected_std(tensor) if std is None else 1.0)).flatten())
    values = torch.cat(weights)
    target = 1.0 if std is None else std
    assert abs(values.std().item() - target) < 0.1 * target, f"HIVE weights have std {values.std():.4f}, expected {std}"
    assert abs(values.mean().item()) < 0.1 * target


# ---------------------------------------------------------------------- 1. initialisation on every path
def test_from_vision_text_initialises_every_hive_tensor():
    assert_freshly_initialised(compose(use_ffn=True, level_mapping="all"))


def test_a_config_alone_initialises_every_hive_tensor():
    config = compose(use_ffn=True).config
    assert_freshly_initialised(AutoModel.from_config(config))


@pytest.mark.parametrize("gate_init", [0.0, 0.25])
def test_from_pretrained_with_an_empty_state_dict_initialises_every_hive_tensor(gate_init):
    config = compose(use_ffn=True, gate_init=gate_init, initializer_range=0.05).config
    model = hive.HiveForConditionalGeneration.from_pretrained(None, config=config, state_dict={})
    assert_freshly_initialised(model, gate_init=gate_init, std=0.05)


def test_get_hive_model_initialises_projectors_and_cross_attention_with_the_configured_std():
    model = hive.get_hive_model(build_llava(), hive.HiveConfig(initializer_range=0.03, use_ffn=True))
    assert_freshly_initialised(model, std=0.03)


def test_a_checkpoint_missing_hive_keys_loads_them_initialised_and_keeps_the_rest(tmp_path):
    """An existing checkpoint reloaded with use_ffn=True: the FFNs are new, everything else is loaded."""
    model = compose()
    set_gates(model, 0.3)
    model.save_pretrained(tmp_path)
    loaded = hive.HiveForConditionalGeneration.from_pretrained(tmp_path, use_ffn=True)
    saved = load_file(tmp_path / "model.safetensors")
    for name, tensor in loaded.state_dict().items():
        if "hive_ffn" in name:
            continue
        torch.testing.assert_close(tensor, saved[name], rtol=0, atol=0, msg=name)
    ffn = {name: tensor for name, tensor in hive_tensors(loaded).items() if "hive_ffn" in name}
    assert ffn and all(torch.isfinite(t).all() for t in ffn.values())
    assert all(torch.all(t == 0) for name, t in ffn.items() if name.endswith("hive_ffn_gate"))
    linear = {name: t for name, t in ffn.items() if name.endswith(".weight") and "norm" not in name}
    weights = torch.cat([(t / expected_std(t)).flatten() for name, t in linear.items()])
    assert abs(weights.std().item() - 1.0) < 0.1  # each ~ N(0, 1/fan_in)


def test_a_config_saved_with_the_earlier_fixed_start_keeps_it_and_the_default_round_trips(tmp_path):
    """Issue 39: the default start became width-scaled (`initializer_range=None`); a config saved before it holds
    0.02, and what that model initialises later (a level or an FFN added on reload) keeps N(0, 0.02)."""
    earlier = compose()
    earlier.config.initializer_range = 0.02  # what every config written before the change holds
    earlier.save_pretrained(tmp_path / "earlier")
    assert '"initializer_range": 0.02' in (tmp_path / "earlier" / "config.json").read_text()
    loaded = hive.HiveForConditionalGeneration.from_pretrained(tmp_path / "earlier", use_ffn=True)
    assert loaded.config.initializer_range == 0.02
    linear = {n: t for n, t in hive_tensors(loaded).items() if "hive_ffn" in n and n.endswith(".weight")}
    weights = torch.cat([t.flatten() for n, t in linear.items() if "norm" not in n])
    assert abs(weights.std().item() - 0.02) < 0.002
    compose().save_pretrained(tmp_path / "now")
    assert hive.HiveConfig.from_pretrained(tmp_path / "now").initializer_range is None


def test_the_default_start_is_one_over_root_fan_in_from_the_toy_width_to_the_paper_shapes():
    """What each tensor starts with at the learning curves' width and at the paper's 1B and 7B shapes (on meta):
    large where the model is narrow, near the earlier 0.02 where HIVE was designed to run."""
    from benchmarks.configs import PAPER_1B, PAPER_7B
    from benchmarks.init_scale import TOY, starting_stds
    from benchmarks.models import build

    toy = starting_stds(build(TOY, "hive"))
    assert {std for _, std in toy.values()} == {0.125}
    for pair, vision, text in ((PAPER_1B, 1152, 2048), (PAPER_7B, 1024, 4096)):
        stds = starting_stds(build(pair, "hive"))
        assert stds["projector layers.0"] == (vision, 1 / math.sqrt(vision))
        assert stds["hive_q_proj"] == stds["hive_k_proj"] == stds["hive_o_proj"] == (text, 1 / math.sqrt(text))
        assert all(0.015 <= std <= 0.035 for _, std in stds.values()), stds


def test_a_checkpoint_without_any_hive_weights_computes_what_its_language_model_computes(tmp_path):
    """A fresh wrap computes what the base computed, however the HIVE weights came to be missing."""
    model = compose()
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "hive_" not in k}, tmp_path / "model.safetensors", {"format": "pt"})
    loaded = hive.HiveForConditionalGeneration.from_pretrained(tmp_path).eval()
    ids = text_ids(2, 9)
    with torch.no_grad():
        expected = build_text("llama")(input_ids=ids).logits  # the same language model, alone
        got = loaded(input_ids=ids, **vision_inputs("siglip", 2)).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


# ---------------------------------------------------------------------- 3. parameter names
def test_the_language_model_keeps_its_own_parameter_names_and_loads_a_plain_checkpoint(tmp_path):
    language_model = build_text("llama")
    language_model.save_pretrained(tmp_path / "plain")
    model = compose()
    assert not [name for name, _ in model.named_parameters() if "base_layer" in name]
    plain_keys = set(LlamaForCausalLM.from_pretrained(tmp_path / "plain").state_dict())
    assert set(model.language_model.state_dict()) == plain_keys  # HIVE lives beside the LM, not inside it
    assert all(key.startswith(("hive_levels.", "hive_blocks.")) for key in hive_tensors(model))
    # A plain Llama state dict loads into the HIVE model's language model, strictly.
    model.language_model.load_state_dict(load_file(tmp_path / "plain" / "model.safetensors"), strict=True)


def test_hive_blocks_are_named_by_the_decoder_layer_they_run_in():
    model = compose(llm_layers=[0, 3], vision_layers=[1, 3])
    assert list(model.hive_blocks.keys()) == ["0", "3"]


def legacy_names(key: str) -> str:
    """How checkpoints written by hive-adapter <= 0.1 named the LM and the blocks (wrapped decoder layers)."""
    match = re.match(r"hive_blocks\.(\d+)\.(.*)", key)
    if match:
        return f"language_model.model.layers.{match[1]}.hive_block.{match[2]}"
    match = re.match(r"(language_model\.model\.layers\.(\d+))\.(.*)", key)
    if match and int(match[2]) in (0, 2):
        return f"{match[1]}.base_layer.{match[3]}"
    return key


def test_a_checkpoint_with_wrapped_layer_names_still_loads(tmp_path):
    model = compose(use_ffn=True)
    set_gates(model, 0.4)
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    legacy = {legacy_names(k): v for k, v in weights.items()}
    assert any(".base_layer." in k for k in legacy) and any(".hive_block." in k for k in legacy)
    save_file(legacy, tmp_path / "model.safetensors", {"format": "pt"})

    loaded = hive.HiveForConditionalGeneration.from_pretrained(tmp_path).eval()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    loaded.save_pretrained(tmp_path / "again")  # re-saved under today's names
    assert set(load_file(tmp_path / "again" / "model.safetensors")) == set(weights)


def test_an_adapter_with_wrapped_layer_names_still_loads(tmp_path):
    model = hive.get_hive_model(build_llava(), hive.HiveConfig(vision_layers=[1, 3], llm_layers=[0, 2]))
    set_gates(model, 0.4)
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / ADAPTER_WEIGHTS_NAME)
    renamed = {
        re.sub(r"^hive_blocks\.(\d+)\.", r"base_model.model.language_model.layers.\1.hive_block.", k): v
        for k, v in weights.items()
    }
    assert renamed != weights
    save_file(renamed, tmp_path / ADAPTER_WEIGHTS_NAME, {"format": "pt"})
    loaded = hive.HiveModel.from_pretrained(build_llava(), tmp_path)
    for name, tensor in weights.items():
        torch.testing.assert_close(dict(loaded.named_parameters())[name].detach(), tensor, rtol=0, atol=0, msg=name)


# ---------------------------------------------------------------------- 2. inputs_embeds
def marker_batch():
    ids = text_ids(2, 10)
    ids[0, 2] = IMAGE_TOKEN
    ids[1, 6] = IMAGE_TOKEN
    return ids


@pytest.mark.parametrize("connector", ["hive", "cascaded", "concat", "deepstack"])
def test_forward_with_inputs_embeds_equals_forward_with_input_ids(connector):
    model = compose("clip", image_token_id=IMAGE_TOKEN, connector=connector)
    set_gates(model, 0.5)
    ids, pixels = marker_batch(), vision_inputs("clip", 2)
    embeds = model.get_input_embeddings()(ids)
    with torch.no_grad():
        expected = model(input_ids=ids, **pixels).logits
        found_in_embeddings = model(inputs_embeds=embeds, **pixels).logits  # markers matched by their embedding
    torch.testing.assert_close(found_in_embeddings, expected)


def test_inputs_embeds_without_a_findable_marker_names_what_to_pass():
    model = compose("clip", image_token_id=IMAGE_TOKEN)
    embeds = torch.randn(2, 10, 64)  # no row equals the marker's embedding
    with pytest.raises(ValueError, match="image marker"):
        model(inputs_embeds=embeds, **vision_inputs("clip", 2))


def test_captioning_takes_inputs_embeds():
    model = compose("siglip")
    set_gates(model, 0.5)
    ids, pixels = text_ids(2, 8), vision_inputs("siglip", 2)
    with torch.no_grad():
        expected = model(input_ids=ids, **pixels).logits
        got = model(inputs_embeds=model.get_input_embeddings()(ids), **pixels).logits
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("connector", ["hive", "cascaded", "concat", "deepstack"])
def test_generate_with_inputs_embeds_gives_the_new_tokens_of_generate_with_input_ids(connector):
    model = compose("clip", image_token_id=IMAGE_TOKEN, connector=connector)
    set_gates(model, 0.5)
    ids, pixels = marker_batch(), vision_inputs("clip", 2)
    settings = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with_ids = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **pixels, **settings)
    with_embeds = model.generate(
        inputs_embeds=model.get_input_embeddings()(ids), attention_mask=torch.ones_like(ids), **pixels, **settings
    )
    torch.testing.assert_close(with_embeds, with_ids[:, ids.shape[1] :], rtol=0, atol=0)


# ---------------------------------------------------------------------- 4. fp32 modules
@pytest.mark.parametrize("use_ffn", [False, True])
def test_the_float32_list_names_modules_that_exist_once(use_ffn):
    model = compose(use_ffn=use_ffn)
    names = list(model._keep_in_fp32_modules_strict)
    assert len(names) == len(set(names))
    assert not model._keep_in_fp32_modules  # one list, the strict one: float32 under fp16 and bf16 alike
    module_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()} | {
        name.rsplit(".", 1)[-1] for name, _ in model.named_parameters()
    }
    assert set(names) <= module_names, set(names) - module_names
    assert any("ffn" in name for name in names) == use_ffn


# ---------------------------------------------------------------------- 5. concat generate returns
def test_concat_generate_returns_the_prompt_in_sequences_as_in_the_tensor():
    model = compose("clip", image_token_id=IMAGE_TOKEN, connector="concat")
    ids, pixels = marker_batch(), vision_inputs("clip", 2)
    settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    tensor = model.generate(input_ids=ids, **pixels, **settings)
    output = model.generate(input_ids=ids, **pixels, **settings, return_dict_in_generate=True, output_scores=True)
    torch.testing.assert_close(output.sequences, tensor, rtol=0, atol=0)
    assert len(output.scores) == 4
    assert math.prod(output.sequences.shape) == 2 * (ids.shape[1] + 4)
