"""The core library on transformers 4.37.2: decoder layers return tuples, nothing reaches layers via
kwargs, and the stack (not the layer) runs gradient checkpointing."""

import pytest
import torch
from transformers import (
    AutoModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

import hive_adapter as hive

IMAGE_TOKEN = 95
VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2, image_size=32, patch_size=8
)
TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=96,
)


def llava():
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**VISION), text_config=LlamaConfig(**TEXT), image_token_index=IMAGE_TOKEN
    )
    return LlavaForConditionalGeneration(config).eval()


def batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 90, (2, 10), generator=generator)
    ids[:, 3] = IMAGE_TOKEN
    return ids, torch.randn(2, 3, 32, 32, generator=generator)


def open_gates(model):
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("_gate"):
                param.fill_(0.5)


def test_running_on_transformers_437():
    import transformers

    assert transformers.__version__ == "4.37.2"


def test_identity_and_exact_unload():
    base = llava()
    ids, pixels = batch()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    with torch.no_grad():
        reference = base(input_ids=ids).logits
    model = hive.get_hive_model(base, hive.HiveConfig(vision_layers=[1, 3], llm_layers=[0, 2], use_ffn=True))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, pixel_values=pixels).logits, reference, rtol=0, atol=0)
    plain = model.unload()
    assert plain.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in plain.state_dict().items())


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_matches_with_a_frozen_base(reentrant):
    def run(checkpointing):
        model = hive.get_hive_model(llava(), hive.HiveConfig(vision_layers=[1, 3], llm_layers=[1, 3], use_ffn=True))
        open_gates(model)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        ids, pixels = batch()
        loss = model(input_ids=ids, pixel_values=pixels, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = run(False)
    loss_ckpt, grads_ckpt = run(True)
    torch.testing.assert_close(loss_ckpt, loss)
    assert grads.keys() == grads_ckpt.keys() and all("hive_" in name for name in grads)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], msg=name)


def test_generation_cached_equals_uncached():
    model = hive.get_hive_model(llava(), hive.HiveConfig(vision_layers=[1, 3], llm_layers=[0, 2]))
    open_gates(model)
    ids, pixels = batch()
    common = dict(
        input_ids=ids,
        pixel_values=pixels,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=5,
        do_sample=False,
        pad_token_id=0,
    )
    assert torch.equal(model.generate(**common), model.generate(**common, use_cache=False))


def test_full_model_auto_round_trip(tmp_path):
    torch.manual_seed(0)
    model = hive.HiveForConditionalGeneration.from_vision_text(
        CLIPVisionModel(CLIPVisionConfig(**VISION)),
        LlamaForCausalLM(LlamaConfig(**TEXT)),
        hive.HiveConfig(vision_layers=[1, 3], llm_layers=[0, 2]),
    ).eval()
    open_gates(model)
    ids, pixels = batch()
    with torch.no_grad():
        expected = model(input_ids=ids, pixel_values=pixels).logits
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    for key, value in loaded.state_dict().items():  # every weight comes back exactly
        assert torch.equal(value, model.state_dict()[key]), key
    with torch.no_grad():  # 4.37 builds from config with eager attention but loads with SDPA: float tolerance
        torch.testing.assert_close(loaded(input_ids=ids, pixel_values=pixels).logits, expected)


def test_exported_clip_encoder_loads_as_llava_vision_tower(tmp_path):
    """hive-export-vision output is what LLaVA's `--vision_tower DIR` reads (CLIPVisionTower)."""
    from types import SimpleNamespace

    from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower
    from transformers import CLIPImageProcessor

    from hive_adapter.tools.export import export_vision_encoder

    torch.manual_seed(0)
    model = hive.HiveForConditionalGeneration.from_vision_text(
        CLIPVisionModel(CLIPVisionConfig(**VISION)), LlamaForCausalLM(LlamaConfig(**TEXT)), hive.HiveConfig()
    )
    model.save_pretrained(tmp_path / "ckpt", safe_serialization=True)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tmp_path / "ckpt"
    )
    export_vision_encoder(tmp_path / "ckpt", tmp_path / "encoder")
    tower = CLIPVisionTower(str(tmp_path / "encoder"), SimpleNamespace(mm_vision_select_layer=-2))
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        torch.testing.assert_close(tower(pixels), expected)
    assert tower.num_patches == 16
