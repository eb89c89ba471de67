"""PEFT's whole LoRA lifecycle on both HIVE classes: wrap, train a step, save, reload onto a fresh base, merge,
unmerge, merge_and_unload, unload; and `HiveModel.unload()` after a merge gives the base back.

Two targets: LoRA on the language model's attention (a pattern that leaves the vision tower alone: SigLIP and
CLIP have `q_proj` too), and LoRA on HIVE's own cross-attention projections (`hive_q_proj`, ...).
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from tiny_models import IMAGE_TOKEN, build_llava, build_text, build_vision, set_gates, text_ids, vision_inputs

import hive_adapter as hive
from hive_adapter.model.attach import LAYER_HOOKS, STACK_HOOKS, hive_hooks_of

TARGETS = {
    "llm": r".*language_model.*\.(q_proj|v_proj)",
    "hive": ["hive_q_proj", "hive_k_proj", "hive_v_proj", "hive_o_proj"],
}


def full_model() -> hive.HiveForConditionalGeneration:
    config = hive.HiveConfig(vision_layers=[1, 3], llm_layers=[0, 2], image_token_id=IMAGE_TOKEN)
    return hive.HiveForConditionalGeneration.from_vision_text(build_vision("siglip"), build_text("llama"), config)


def adapter_model() -> hive.HiveModel:
    return hive.get_hive_model(build_llava(), hive.HiveConfig(vision_layers=[1, 3], llm_layers=[0, 2]))


BUILDERS = {"full": full_model, "adapter": adapter_model}
PIXELS = {"full": "siglip", "adapter": "clip"}


def fresh(kind: str) -> torch.nn.Module:
    model = BUILDERS[kind]()
    set_gates(model, 0.5)  # HIVE changes the outputs, so LoRA on its projections matters
    return model.eval()


def batch(kind: str) -> dict[str, torch.Tensor]:
    return {"input_ids": text_ids(2, 10, marker_at=3), **vision_inputs(PIXELS[kind], 2)}


@torch.no_grad()
def logits(model, inputs) -> torch.Tensor:
    return model(**inputs).logits


def trained_peft(kind: str, target: str) -> PeftModel:
    """LoRA on `target` around a fresh HIVE model, after one SGD step (B moves off zero)."""
    peft_model = get_peft_model(fresh(kind), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[target]))
    lora = [name for name, module in peft_model.named_modules() if isinstance(module, LoraLayer)]
    assert lora, "no module was adapted"
    assert not [name for name in lora if "vision" in name], "LoRA reached the vision tower"
    assert all(("hive_" in name) == (target == "hive") for name in lora)
    inputs = batch(kind)
    peft_model.train()
    peft_model(**inputs, labels=inputs["input_ids"]).loss.backward()
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad and param.grad is not None:
                param -= 0.5 * param.grad
    peft_model.zero_grad(set_to_none=True)
    return peft_model.eval()


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("kind", BUILDERS)
def test_lora_lifecycle(kind, target, tmp_path):
    inputs = batch(kind)
    before = logits(fresh(kind), inputs)
    peft_model = trained_peft(kind, target)
    trained = logits(peft_model, inputs)
    assert (trained - before).abs().max() > 1e-4, "the LoRA step changed nothing"

    # save, and reload onto a fresh base: the same outputs
    peft_model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(fresh(kind), tmp_path).eval()
    torch.testing.assert_close(logits(reloaded, inputs), trained)

    # merge in place and back out
    peft_model.merge_adapter()
    torch.testing.assert_close(logits(peft_model, inputs), trained, rtol=1e-4, atol=1e-5)
    peft_model.unmerge_adapter()
    torch.testing.assert_close(logits(peft_model, inputs), trained, rtol=1e-4, atol=1e-5)

    # merge_and_unload: the HIVE model itself, LoRA baked in, no PEFT module left
    merged = peft_model.merge_and_unload()
    assert isinstance(merged, type(fresh(kind)))
    assert not [n for n, m in merged.named_modules() if isinstance(m, LoraLayer) or hasattr(m, "base_layer")]
    torch.testing.assert_close(logits(merged, inputs), trained, rtol=1e-4, atol=1e-5)

    # unload: LoRA dropped without merging, the HIVE model as it was
    unloaded = PeftModel.from_pretrained(fresh(kind), tmp_path).unload()
    torch.testing.assert_close(logits(unloaded, inputs), before, rtol=0, atol=0)


@pytest.mark.parametrize("target", TARGETS)
def test_hive_unload_after_a_merge_gives_the_base_back(target):
    """LoRA on HIVE merged, then HIVE unloaded: the llava-hf base exactly as built. LoRA on the LM merged: the
    base with exactly the merged weights, running as a plain llava-hf model again."""
    merged = trained_peft("adapter", target).merge_and_unload()
    merged_state = {name: tensor.clone() for name, tensor in merged.base_model.state_dict().items()}
    base = merged.unload()
    pristine = build_llava()
    assert type(base) is type(pristine)
    assert base.state_dict().keys() == pristine.state_dict().keys()
    for name, tensor in base.state_dict().items():
        assert torch.equal(tensor, merged_state[name]), name
        if target == "hive":
            assert torch.equal(tensor, pristine.state_dict()[name]), name
    ids = text_ids(2, 10)
    with torch.no_grad():
        plain = pristine.eval()
        if target == "llm":
            plain.load_state_dict(merged_state)
        torch.testing.assert_close(base(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=0, atol=0)
    hive_hooks = (*LAYER_HOOKS, *STACK_HOOKS)  # (transformers adds hooks of its own to capture hidden states)
    assert not [name for name, module in base.named_modules() if hive_hooks_of(module, hive_hooks)]


def _tower_slot(model) -> tuple[torch.nn.Module, str]:
    """(parent, attribute) where the model's vision tower stands."""
    from hive_adapter.model.architectures import find_vision_tower

    root = model.base_model if isinstance(model, hive.HiveModel) else model
    tower = find_vision_tower(root, None) if isinstance(model, hive.HiveModel) else model.vision_model
    name = next(name for name, module in model.named_modules() if module is tower)
    parent_name, _, attribute = name.rpartition(".")
    return model.get_submodule(parent_name), attribute


@pytest.mark.parametrize("kind", BUILDERS)
def test_hive_runs_the_vision_tower_that_stands_in_the_model_now(kind):
    """A tower replaced after wrapping (by PEFT's modules_to_save, or a user swapping encoders) is the one HIVE
    runs: replacing it by a changed copy gives what changing it in place gives."""
    import copy

    inputs = batch(kind)
    in_place, replaced = fresh(kind), fresh(kind)
    before = logits(in_place, inputs)
    parent, attribute = _tower_slot(in_place)
    with torch.no_grad():
        for param in getattr(parent, attribute).parameters():
            param.mul_(1.5)
    parent, attribute = _tower_slot(replaced)
    changed = copy.deepcopy(getattr(parent, attribute))
    with torch.no_grad():
        for param in changed.parameters():
            param.mul_(1.5)
    setattr(parent, attribute, changed)
    expected = logits(in_place, inputs)
    assert not torch.allclose(expected, before)
    torch.testing.assert_close(logits(replaced, inputs), expected)


def test_peft_modules_to_save_on_the_vision_tower_trains_the_tower_hive_reads():
    peft_model = get_peft_model(
        fresh("full"), LoraConfig(r=4, target_modules=TARGETS["hive"], modules_to_save=["vision_model"])
    )
    inputs = batch("full")
    before = logits(peft_model, inputs)
    trained_copy = peft_model.base_model.model.vision_model.modules_to_save["default"]
    with torch.no_grad():
        for param in trained_copy.parameters():
            param.mul_(1.5)  # what training the saved copy does
    assert not torch.allclose(logits(peft_model, inputs), before), "HIVE still runs the tower PEFT set aside"
