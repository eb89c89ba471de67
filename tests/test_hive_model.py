"""HiveModel (PEFT-style) on a real llava-hf model: identity, unload, adapter files, freezing, gradients."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import IMAGE_TOKEN, build_llava, set_gates, text_ids, vision_inputs

import hive_adapter as hive
from hive_adapter.model.adapter_model import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME

CONFIG = dict(vision_layers=[0, 1, 2, 3], llm_layers=[0, 1, 2, 3], tokens_per_level=4)


def wrapped(seed=0, **overrides):
    return hive.get_hive_model(build_llava(seed), hive.HiveConfig(**{**CONFIG, **overrides}))


@pytest.mark.parametrize("placement", ["before", "after"])
@pytest.mark.parametrize("use_ffn", [False, True])
def test_fresh_adapter_is_the_identity(placement, use_ffn):
    base = build_llava()
    ids = text_ids(2, 12)
    with torch.no_grad():
        reference = base(input_ids=ids).logits
    model = hive.get_hive_model(base, hive.HiveConfig(**CONFIG, placement=placement, use_ffn=use_ffn)).eval()
    with torch.no_grad():
        text_only = model(input_ids=ids).logits
        marked = ids.clone()
        marked[:, 4] = IMAGE_TOKEN
        with_image = model(input_ids=marked, **vision_inputs("clip", 2)).logits
    torch.testing.assert_close(text_only, reference, rtol=0, atol=0)
    # With an image the zero gates still change nothing: the marker is an ordinary token to the LM.
    model.unload()
    with torch.no_grad():
        base_marked = base(input_ids=marked).logits
    torch.testing.assert_close(with_image, base_marked, rtol=0, atol=0)


def test_images_do_not_enter_the_sequence():
    model = wrapped().eval()
    ids = text_ids(2, 10, marker_at=3)
    with torch.no_grad():
        out = model(input_ids=ids, **vision_inputs("clip", 2))
    assert out.logits.shape[:2] == (2, 10)  # one marker token, not 16 spliced patches


def test_open_gates_change_the_output_only_after_the_image():
    model = wrapped().eval()
    set_gates(model, 0.7)
    ids = text_ids(1, 12, marker_at=5)
    with torch.no_grad():
        with_hive = model(input_ids=ids, **vision_inputs("clip", 1)).logits
    plain = model.unload()
    with torch.no_grad():
        reference = plain(input_ids=ids).logits
    torch.testing.assert_close(with_hive[:, :5], reference[:, :5], rtol=0, atol=0)  # text before the image
    assert (with_hive[:, 5:] - reference[:, 5:]).abs().max() > 1e-4  # the image matters after its marker


def test_unload_restores_the_exact_base():
    base = build_llava()
    for param in base.model.vision_tower.parameters():  # a user's own freezing must survive too
        param.requires_grad_(False)
    modules = {name: module for name, module in base.named_modules()}
    state = {k: v.clone() for k, v in base.state_dict().items()}
    flags = {name: p.requires_grad for name, p in base.named_parameters()}
    model = hive.get_hive_model(base, hive.HiveConfig(**CONFIG))
    set_gates(model, 0.5)
    ids = text_ids(2, 8, marker_at=2)
    model(input_ids=ids, **vision_inputs("clip", 2), labels=ids).loss.backward()
    plain = model.unload()
    assert plain is base
    assert {name: module for name, module in plain.named_modules()}.keys() == modules.keys()
    for name, module in plain.named_modules():
        assert module is modules[name], name
    assert plain.state_dict().keys() == state.keys()
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    assert {name: p.requires_grad for name, p in plain.named_parameters()} == flags
    assert not any("hive" in name for name, _ in plain.named_modules())
    assert plain.model.language_model._forward_pre_hooks == {}


def test_only_hive_parameters_train_and_counts_are_right(capsys):
    model = wrapped()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("hive_" in name for name in trainable)
    assert trainable == {name for name, _ in model.hive_named_parameters()}
    model.print_trainable_parameters()
    printed = capsys.readouterr().out
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert f"trainable params: {count:,}" in printed


def test_gradients_reach_every_selected_vision_level():
    model = wrapped(vision_layers=[0, 2], llm_layers=[1, 3])
    for param in model.base_model.model.vision_tower.parameters():  # stage 3: the encoder trains too
        param.requires_grad_(True)
    set_gates(model, 0.5)
    outputs = {}
    layers = (
        model.base_model.model.vision_tower.vision_model.encoder.layers
        if hasattr(model.base_model.model.vision_tower, "vision_model")
        else model.base_model.model.vision_tower.encoder.layers
    )

    def keep(index):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            hidden.retain_grad()
            outputs[index] = hidden

        return hook

    handles = [layer.register_forward_hook(keep(i)) for i, layer in enumerate(layers)]
    ids = text_ids(2, 10, marker_at=2)
    model(input_ids=ids, **vision_inputs("clip", 2), labels=ids).loss.backward()
    for handle in handles:
        handle.remove()
    for level in (0, 2):  # both selected levels get a direct signal from the LM loss
        assert outputs[level].grad is not None and outputs[level].grad.abs().sum() > 0, level
    assert outputs[3].grad is None or outputs[3].grad.abs().sum() == 0  # above the deepest level: nothing
    for name, param in model.hive_named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    for param in model.base_model.model.language_model.parameters():
        if not any(param is p for _, p in model.hive_named_parameters()):
            assert param.grad is None  # the frozen LLM gets no gradient


def test_zero_gates_still_train_the_gates():
    model = wrapped()
    ids = text_ids(2, 10, marker_at=2)
    model(input_ids=ids, **vision_inputs("clip", 2), labels=ids).loss.backward()
    gates = [p for name, p in model.hive_named_parameters() if name.endswith("hive_attn_gate")]
    assert len(gates) == 4 and all(g.grad is not None and g.grad.abs().sum() > 0 for g in gates)


def test_adapter_save_writes_two_files_and_round_trips(tmp_path):
    model = wrapped(use_ffn=True).eval()
    set_gates(model, 0.3)
    with torch.no_grad():
        for _, param in model.hive_named_parameters():
            param.add_(torch.randn_like(param) * 0.01)
    ids = text_ids(2, 10, marker_at=3)
    pixels = vision_inputs("clip", 2)
    with torch.no_grad():
        expected = model(input_ids=ids, **pixels).logits
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME])
    saved = load_file(str(tmp_path / ADAPTER_WEIGHTS_NAME))
    assert saved.keys() == dict(model.hive_named_parameters()).keys()
    assert json.loads((tmp_path / ADAPTER_CONFIG_NAME).read_text())["use_ffn"] is True

    again = hive.HiveModel.from_pretrained(build_llava(), tmp_path).eval()
    with torch.no_grad():
        got = again(input_ids=ids, **pixels).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not any(p.requires_grad for p in again.parameters())
    trainable = hive.HiveModel.from_pretrained(build_llava(), tmp_path, is_trainable=True)
    assert all(p.requires_grad for _, p in trainable.hive_named_parameters())


@pytest.mark.parametrize("damage", ["missing", "unexpected", "reshaped"])
def test_adapter_loading_fails_loudly(tmp_path, damage):
    wrapped().save_pretrained(tmp_path)
    path = tmp_path / ADAPTER_WEIGHTS_NAME
    tensors = load_file(str(path))
    name = sorted(tensors)[0]
    if damage == "missing":
        del tensors[name]
    elif damage == "unexpected":
        tensors["hive_levels.extra.weight"] = torch.zeros(1)
    else:
        tensors[name] = torch.zeros(3, 3)
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match=damage if damage != "reshaped" else "has shape"):
        hive.HiveModel.from_pretrained(build_llava(), tmp_path)


def test_adapter_refuses_a_base_of_another_width(tmp_path):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    wrapped().save_pretrained(tmp_path)
    wider = LlavaForConditionalGeneration(
        LlavaConfig(
            vision_config=CLIPVisionConfig(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=4,
                num_attention_heads=2,
                image_size=32,
                patch_size=8,
            ),
            text_config=LlamaConfig(
                hidden_size=96,
                intermediate_size=128,
                num_hidden_layers=4,
                num_attention_heads=4,
                num_key_value_heads=2,
                vocab_size=96,
            ),
            image_token_index=IMAGE_TOKEN,
        )
    )
    with pytest.raises(ValueError, match="trained on a base with 64 language model width, this base has 96"):
        hive.HiveModel.from_pretrained(wider, tmp_path)


def test_wrapping_twice_is_refused():
    model = wrapped()
    with pytest.raises(ValueError, match="already a HiveModel"):
        hive.get_hive_model(model, hive.HiveConfig(**CONFIG))


def test_cascaded_concat_and_deepstack_run_through_the_same_class():
    ids = text_ids(2, 10, marker_at=3)
    pixels = vision_inputs("clip", 2)
    cascaded = wrapped(connector="cascaded")
    assert len(cascaded.hive_levels.projectors) == 1
    assert cascaded(input_ids=ids, **pixels, labels=ids).loss.isfinite()
    concat = wrapped(connector="concat")
    out = concat(input_ids=ids, **pixels, labels=ids)
    assert out.logits.shape[1] == 10 - 1 + 4  # marker replaced by the 4 pooled image tokens
    out.loss.backward()
    assert all(p.grad is not None for _, p in concat.hive_named_parameters())
    deepstack = wrapped(connector="deepstack")  # on a llava-hf base too: every level trains
    assert len(deepstack.hive_levels.projectors) == 4 and not deepstack.hive_blocks  # 3 added, 1 spliced
    out = deepstack(input_ids=ids, **pixels, labels=ids)
    assert out.logits.shape[1] == 10 - 1 + 4
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in deepstack.hive_named_parameters())


def test_marker_count_must_match_images():
    model = wrapped()
    ids = text_ids(2, 10, marker_at=3)
    with pytest.raises(ValueError, match="2 image marker tokens .* 3 images"):
        model(input_ids=ids, **vision_inputs("clip", 3))
