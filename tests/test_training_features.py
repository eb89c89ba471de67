"""Gradient checkpointing, LoRA next to HIVE, bf16/fp16 bases, kernel choice and bad input."""

import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from tiny_models import IMAGE_TOKEN, build_llava, build_text, build_vision, set_gates, text_ids, vision_inputs
from tokenizers import Tokenizer, models
from transformers import LlavaForConditionalGeneration, PreTrainedTokenizerFast

import hive_adapter as hive
import hive_adapter.model.cross_attention

CONFIG = dict(vision_layers=[1, 3], llm_layers=[1, 3], use_ffn=True, tokens_per_level=4)


def adapter():
    return hive.get_hive_model(build_llava(), hive.HiveConfig(**CONFIG))


def full():
    model = hive.HiveForConditionalGeneration.from_vision_text(
        build_vision("siglip"), build_text("qwen2"), hive.HiveConfig(**CONFIG, image_token_id=IMAGE_TOKEN)
    )
    hive.mark_hive_trainable(model)
    for name, param in model.named_parameters():  # frozen base, as in stage 1: its inputs need no grad
        param.requires_grad_("hive_" in name)
    return model


BUILDERS = {"adapter": adapter, "full": full}


def loss_and_grads(model, checkpointing=None):
    set_gates(model, 0.5)
    model.train()
    calls = []
    blocks = [m for m in model.modules() if isinstance(m, hive.HiveCrossAttentionBlock)]
    handles = [
        b.register_forward_pre_hook(lambda *a: calls.append(1)) for b in blocks
    ]  # post-hooks miss early-stopped replays
    if checkpointing is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
    ids = text_ids(2, 10, marker_at=2)
    out = model(
        input_ids=ids,
        **vision_inputs("siglip" if isinstance(model, hive.HiveForConditionalGeneration) else "clip", 2),
        labels=ids,
    )
    out.loss.backward()
    for handle in handles:
        handle.remove()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads, len(calls) / len(blocks)


@pytest.mark.parametrize("kind", BUILDERS)
@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(kind, reentrant):
    loss, grads, runs = loss_and_grads(BUILDERS[kind]())
    loss_ckpt, grads_ckpt, runs_ckpt = loss_and_grads(BUILDERS[kind](), checkpointing=reentrant)
    assert runs == 1 and runs_ckpt == 2  # each HIVE block really was recomputed in backward
    torch.testing.assert_close(loss_ckpt, loss)
    assert grads_ckpt.keys() == grads.keys() and grads
    assert all("hive_" in name for name in grads)  # frozen base: only HIVE is trained
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], msg=name)


def test_lora_on_the_llm_next_to_hive_trains_both_and_saves_both(tmp_path):
    hive_model = adapter()
    set_gates(hive_model, 0.5)
    peft_model = get_peft_model(hive_model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert hive.mark_hive_trainable(peft_model) > 0  # PEFT froze everything but LoRA
    lora_layers = [name for name, module in peft_model.named_modules() if isinstance(module, LoraLayer)]
    assert lora_layers and not [name for name in lora_layers if "hive_" in name]  # HIVE is never a LoRA target
    assert any("language_model" in name for name in lora_layers)

    ids = text_ids(2, 10, marker_at=2)
    pixels = vision_inputs("clip", 2)
    peft_model(input_ids=ids, **pixels, labels=ids).loss.backward()
    trained = {name for name, p in peft_model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any("lora_B" in name for name in trained) and any("hive_" in name for name in trained)
    assert all("lora_" in name or "hive_" in name for name in trained)
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    optimizer.step()
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(input_ids=ids, **pixels).logits

    peft_model.save_pretrained(tmp_path)  # LoRA: adapter_config.json + adapter_model.safetensors
    hive_model.save_pretrained(tmp_path)  # HIVE: hive_config.json + hive_adapter.safetensors
    files = {p.name for p in tmp_path.iterdir()}
    assert {"adapter_model.safetensors", "hive_adapter.safetensors"} <= files

    reloaded = PeftModel.from_pretrained(hive.HiveModel.from_pretrained(build_llava(), tmp_path), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids, **pixels).logits, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_bases_match_float32_and_keep_gates_in_float32(dtype):
    reference = adapter().eval()
    set_gates(reference, 0.5)
    half = hive.get_hive_model(build_llava().to(dtype), hive.HiveConfig(**CONFIG)).eval()
    half.load_state_dict(reference.state_dict())
    for name, param in half.hive_named_parameters():
        expected = torch.float32 if ("gate" in name or "_norm" in name) else dtype
        assert param.dtype == expected, name
    ids = text_ids(2, 10, marker_at=2)
    pixels = vision_inputs("clip", 2)
    with torch.no_grad():
        want = reference(input_ids=ids, **pixels).logits
        got = half(input_ids=ids, **pixels).logits
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=3e-2)


def test_full_model_loaded_in_bf16_keeps_gates_and_norms_in_float32(tmp_path):
    model = full()
    model.save_pretrained(tmp_path)
    loaded = hive.HiveForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16)
    for name, param in loaded.hive_named_parameters():
        expected = torch.float32 if ("gate" in name or "_norm" in name) else torch.bfloat16
        assert param.dtype == expected, name


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_cross_attention_follows_the_base_attention_implementation(implementation):
    base = LlavaForConditionalGeneration._from_config(build_llava().config, attn_implementation=implementation)
    model = hive.get_hive_model(base, hive.HiveConfig(**CONFIG))
    kernels = {m.implementation for m in model.modules() if isinstance(m, hive.HiveCrossAttention)}
    assert kernels == {implementation}
    forced = hive.get_hive_model(build_llava(), hive.HiveConfig(**CONFIG, cross_attn_implementation="eager"))
    assert {m.implementation for m in forced.modules() if isinstance(m, hive.HiveCrossAttention)} == {"eager"}


@pytest.mark.parametrize(
    "pixels, fragment",
    [
        (torch.randn(2, 3, 30, 30), "pixel_values of size 30x30: not a multiple of the encoder's patch size 8"),
        (torch.randn(2, 1, 32, 32), "pixel_values of shape \\(2, 1, 32, 32\\)"),
        (torch.randn(2, 32, 32), "pixel_values of shape \\(2, 32, 32\\)"),
    ],
)
def test_bad_pixel_values_are_named(pixels, fragment):
    with pytest.raises(ValueError, match=fragment):
        adapter()(input_ids=text_ids(2, 8, marker_at=2), pixel_values=pixels)


def test_a_marker_outside_the_vocabulary_is_refused():
    with pytest.raises(ValueError, match="image_token_id=500 is outside the language model's vocabulary of 96"):
        hive.get_hive_model(build_llava(), hive.HiveConfig(**CONFIG, image_token_id=500))


def test_a_tokenizer_without_the_marker_is_refused():
    vocab = {"<unk>": 0, "a": 1, "red": 2, "square": 3}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")))
    with pytest.raises(ValueError, match="the tokenizer has no '<image>' token: add it with tokenizer.add_tokens"):
        hive.image_token_id_from_tokenizer(tokenizer)
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    assert hive.image_token_id_from_tokenizer(tokenizer) == 4


def test_calling_the_wrapped_base_directly_is_an_error_not_a_silent_skip():
    model = adapter()
    with pytest.raises(RuntimeError, match="ran without a vision context"):
        model.base_model(input_ids=text_ids(1, 5))


@pytest.mark.skipif(
    not torch.cuda.is_available() or hive.model.cross_attention.flash_varlen_function() is None,
    reason="flash-attn needs CUDA and the flash_attn package (runs on a GPU machine only)",
)
def test_flash_attention_matches_sdpa_with_padding():
    """Captioning (every token sees its own image) with left-padded text: the case flash's varlen kernel takes."""
    config = dict(vision_layers=[1, 3], llm_layers=[1, 3], tokens_per_level=4)
    results = {}
    for kernel in ("sdpa", "flash_attention_2"):
        model = (
            hive.HiveForConditionalGeneration.from_vision_text(
                build_vision("siglip"), build_text("llama"), hive.HiveConfig(**config, cross_attn_implementation=kernel)
            )
            .to("cuda", torch.bfloat16)
            .eval()
        )
        set_gates(model, 0.5)
        ids = text_ids(2, 10).cuda()
        mask = torch.ones_like(ids)
        mask[1, :4] = 0
        with torch.no_grad():
            results[kernel] = model(
                input_ids=ids, attention_mask=mask, **{k: v.cuda() for k, v in vision_inputs("siglip", 2).items()}
            ).logits.float()
    torch.testing.assert_close(results["flash_attention_2"][:, 4:], results["sdpa"][:, 4:], atol=2e-2, rtol=2e-2)


def test_an_encoder_whose_native_size_is_not_a_patch_multiple_is_accepted():
    """SigLIP-so400m/14@384 (the paper's encoder) makes 27x27 patches of a 384 image: native size is fine."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    vision = SiglipVisionModel(
        SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=2,
            image_size=36,
            patch_size=8,
        )
    )
    model = hive.HiveForConditionalGeneration.from_vision_text(vision, build_text("llama"), hive.HiveConfig())
    levels, _ = model.hive_encode_images(torch.randn(2, 3, 36, 36))
    assert levels[0].shape[1] == 16  # floor(36 / 8) ** 2
    with pytest.raises(ValueError, match="pixel_values of size 34x34: not a multiple"):
        model.hive_encode_images(torch.randn(2, 3, 34, 34))
