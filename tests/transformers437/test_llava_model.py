"""HIVE inside the LLaVA repo's own model classes (llava-torch 1.2.2, transformers 4.37), in-process.

What a LLaVA user depends on before training anything: identity at init, the marker semantics (text
before `<image>` is untouched), gradients reaching every HIVE parameter (also under 4.37's stack-level
gradient checkpointing) and nothing else when the LLM is frozen, LLaVA's upstream connector unchanged.
"""

from __future__ import annotations

import gc

import pytest
import torch

llava_train = pytest.importorskip("llava.train.train")

from llava_helpers import blocks_by_position, rewrite_with_blocks_by_position

from hive_adapter.integrations.llava import (
    apply_patch,
    drop_image_markers,
    hive_modules_of,
)
from hive_adapter.integrations.llava.toy import write_llava_toy
from hive_adapter.model.context import HiveVisionContext

M = -200  # llava.constants.IMAGE_TOKEN_INDEX


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_llava_toy(tmp_path_factory.mktemp("llava-toy"), samples=16)


def build(toy, **hive_flags):
    """LlavaLlamaForCausalLM + initialize_vision_modules, as LLaVA's train() does it."""
    apply_patch()
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM

    torch.manual_seed(0)
    model = LlavaLlamaForCausalLM.from_pretrained(toy["vicuna"])
    model_args = llava_train.ModelArguments(
        model_name_or_path=str(toy["vicuna"]),
        vision_tower=str(toy["clip"]),
        mm_vision_select_layer=-2,
        mm_projector_type="mlp2x_gelu",
        **hive_flags,
    )
    model.get_model().initialize_vision_modules(model_args=model_args)
    model.get_vision_tower().to(torch.float32)
    model.config.tokenizer_padding_side = "right"
    return model.eval()


def set_gates(model, value: float) -> None:
    for name, parameter in model.named_parameters():
        if name.endswith("_gate"):
            parameter.data.fill_(value)


def images(count: int) -> torch.Tensor:
    return torch.randn(count, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def lm_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """The plain language model's logits on `ids`: HIVE's hooks detached for the call, then put back."""
    from transformers import LlamaForCausalLM

    projector = hive_modules_of(model)
    if projector is not None:
        projector.detach()
    try:
        with torch.no_grad():
            return LlamaForCausalLM.forward(model, input_ids=ids).logits
    finally:
        if projector is not None:
            projector.attach(model.get_model())


def test_upstream_connector_is_unchanged(toy):
    model = build(toy, vision_connector="mlp")
    assert hive_modules_of(model) is None
    assert isinstance(model.get_model().mm_projector, torch.nn.Sequential)
    assert model.config.mm_projector_type == "mlp2x_gelu"
    assert not any(hasattr(layer, "hive_call") for layer in model.model.layers)


def test_parameter_names_and_identity_at_init(toy):
    plain = build(toy, vision_connector="mlp")
    model = build(toy, vision_connector="hive", hive_vision_layers="1,3,5,7", hive_llm_layers="0,1,2,3")
    hive_names = [name for name, _ in model.named_parameters() if "hive_" in name]
    assert hive_names and all(name.startswith("model.mm_projector.") for name in hive_names)
    # The LLM keeps upstream's parameter names: its checkpoints load unchanged.
    llm_names = {name for name, _ in plain.named_parameters() if "mm_projector" not in name}
    assert llm_names == {name for name, _ in model.named_parameters() if "mm_projector" not in name}

    ids = torch.tensor([[1, 5, 6, M, 7, 8, 9, 10]])
    with torch.no_grad():
        logits = model(input_ids=ids, images=images(1)).logits
    reference = lm_logits(model, torch.tensor([[1, 5, 6, 7, 8, 9, 10]]))
    torch.testing.assert_close(logits, reference, rtol=0, atol=0)


def test_text_before_the_image_is_untouched(toy):
    model = build(toy, vision_connector="hive")
    set_gates(model, 1.0)
    ids = torch.tensor([[1, 5, 6, M, 7, 8, 9, 10]])
    with torch.no_grad():
        logits = model(input_ids=ids, images=images(1)).logits  # markers dropped: 7 columns
    reference = lm_logits(model, torch.tensor([[1, 5, 6, 7, 8, 9, 10]]))
    torch.testing.assert_close(logits[:, :3], reference[:, :3], rtol=0, atol=0)
    assert (logits[:, 3:] - reference[:, 3:]).abs().amax() > 1e-3


def test_batch_with_text_only_sample_and_padding(toy):
    """LLaVA's collator: right padding (pad = unk = 0), a blank image for a sample without a marker."""
    model = build(toy, vision_connector="hive")
    set_gates(model, 1.0)
    ids = torch.tensor([[1, M, 5, 6, 7, 0, 0], [1, 8, 9, 10, 11, 12, 13]])
    mask = ids.ne(0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, images=images(2)).logits
    assert logits.shape[:2] == (2, 7)  # row 0's marker moved into its padding; row 1 has none to cut
    # Row 1 has no marker: its image is a placeholder nobody sees, so it equals the plain LM.
    torch.testing.assert_close(logits[1], lm_logits(model, ids[1:])[0], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="pairs images with samples in order"):
        model(input_ids=ids, attention_mask=mask, images=images(3))


def test_gradients_reach_every_hive_parameter_and_only_them(toy):
    model = build(toy, vision_connector="hive")
    set_gates(model, 0.5)
    model.requires_grad_(False)  # --tune_mm_mlp_adapter
    for parameter in model.get_model().mm_projector.parameters():
        parameter.requires_grad_(True)
    model.train()
    ids = torch.tensor([[1, M, 5, 6, 7, 8]])
    labels = torch.tensor([[-100, M, 5, 6, 7, 8]])
    model(input_ids=ids, labels=labels.where(labels != M, -100), images=images(1)).loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values()), [
        name for name, g in grads.items() if g is None or g.abs().sum() == 0
    ]
    assert all(p.grad is None for name, p in model.named_parameters() if "mm_projector" not in name)


def test_stack_level_gradient_checkpointing_keeps_vision_gradients(toy):
    """transformers 4.37 checkpoints layers from LlamaModel (reentrant): HIVE's K/V must still get gradients."""
    grads = []
    for checkpointing in (False, True):
        model = build(toy, vision_connector="hive")
        set_gates(model, 0.5)
        model.requires_grad_(False)
        for parameter in model.get_model().mm_projector.parameters():
            parameter.requires_grad_(True)
        if checkpointing:
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()
        model.train()
        ids = torch.tensor([[1, M, 5, 6, 7, 8]])
        model(input_ids=ids, labels=torch.tensor([[-100, -100, 5, 6, 7, 8]]), images=images(1)).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)


def test_generation_cached_equals_uncached_and_equals_forward_loop(toy):
    model = build(toy, vision_connector="hive")
    set_gates(model, 1.0)
    ids = torch.tensor([[1, 5, M, 6, 7]])
    pixels = images(1)
    cached = model.generate(ids, images=pixels, do_sample=False, max_new_tokens=6, use_cache=True)
    uncached = model.generate(ids, images=pixels, do_sample=False, max_new_tokens=6, use_cache=False)
    assert torch.equal(cached, uncached)
    # Reference: full forward passes on the growing (marker-holding) sequence, no cache.
    sequence = ids
    new = []
    with torch.no_grad():
        for _ in range(6):
            token = model(input_ids=sequence, images=pixels).logits[:, -1].argmax(-1, keepdim=True)
            new.append(token)
            sequence = torch.cat([sequence, token], dim=1)
    reference = torch.cat(new, dim=1)
    assert torch.equal(cached[:, -6:], reference)


def test_a_cached_forward_loop_continues_its_own_prompt_and_nothing_outlives_the_cache(toy):
    """LLaVA's forward, decoding by hand with 4.37's legacy tuple cache (new tuples every step): each step
    continues the prompt its cache carries, even with another prompt run in between; once the caches are
    dropped no context is left (LLaVA's forward opens the scope in prepare_inputs, the stack's end closes it)."""
    model = build(toy, vision_connector="hive")
    set_gates(model, 1.0)
    runtime = hive_modules_of(model).runtime
    ids = torch.tensor([[1, 5, M, 6, 7]])
    with torch.no_grad():
        expected = model.generate(ids, images=images(1), do_sample=False, max_new_tokens=4)
        out = model(input_ids=ids, images=images(1), use_cache=True)
        assert isinstance(out.past_key_values, tuple)
        other = model(input_ids=ids, images=-images(1), use_cache=True)  # another prompt, other image
        new = []
        for _ in range(4):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            new.append(token)
            out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
            assert runtime.context is None
    assert torch.equal(torch.cat(new, dim=1), expected[:, -4:])
    assert runtime.cached_vision_bytes(other.past_key_values) > 0
    del out, other
    gc.collect()
    assert not any(isinstance(obj, HiveVisionContext) for obj in gc.get_objects())


def test_an_exception_inside_llava_forward_releases_the_prompt(toy):
    model = build(toy, vision_connector="hive")
    runtime = hive_modules_of(model).runtime

    class Boom(Exception):
        pass

    def fail(*args):
        raise Boom

    handle = model.get_model().layers[1].register_forward_hook(fail)
    try:
        with pytest.raises(Boom):
            model(input_ids=torch.tensor([[1, 5, M, 6, 7]]), images=images(1), use_cache=True)
    finally:
        handle.remove()
    assert runtime.context is None


def test_drop_image_markers_right_and_left():
    ids = torch.tensor([[1, 5, M, 6, 0], [1, M, 7, M, 8]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    labels = torch.tensor([[-100, 5, -100, 6, -100], [-100, -100, 7, -100, 8]])
    right = drop_image_markers(ids, mask, labels, None, padding_side="right")
    assert right.input_ids.tolist() == [[1, 5, 6, 0], [1, 7, 8, 0]]
    assert right.attention_mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 0]]
    assert right.labels.tolist() == [[-100, 5, 6, -100], [-100, 7, 8, -100]]
    assert right.marker_positions[0, 0] == 2 and right.marker_positions[1].tolist() == [1, 2]
    assert right.marker_counts.tolist() == [1, 2]

    left_ids = torch.tensor([[0, 0, 1, M, 6], [1, 5, M, 6, 7]])
    left = drop_image_markers(left_ids, left_ids.ne(0), None, torch.zeros_like(left_ids), padding_side="left")
    assert left.input_ids.tolist() == [[0, 0, 1, 6], [1, 5, 6, 7]]
    assert left.marker_positions[:, 0].tolist() == [3, 2]
    assert left.position_ids.tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]
    with pytest.raises(ValueError, match="padding_side='middle'"):
        drop_image_markers(ids, mask, None, None, padding_side="middle")


def test_mm_projector_lr_applies_to_every_hive_parameter(toy, tmp_path):
    """LLaVA's LLaVATrainer.create_optimizer groups parameters by the name `mm_projector`."""
    model = build(toy, vision_connector="hive")
    args = llava_train.TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, learning_rate=2e-5, mm_projector_lr=1e-3, report_to="none"
    )
    trainer = llava_train.LLaVATrainer(model=model, args=args)
    optimizer = trainer.create_optimizer()
    rate_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert rate_of[id(parameter)] == (1e-3 if "mm_projector" in name else 2e-5), name
    assert sum(1 for name, _ in model.named_parameters() if "hive_" in name) > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gates_and_norms_stay_float32_when_loaded_or_cast_to_half_precision(toy, tmp_path, dtype):
    """LLaVA loads with `torch_dtype=` (transformers 4.37 builds the model under that default dtype) and casts with
    `.to()`; HIVE's gates and norms are float32 on this path as on the Hugging Face one (issue 24, item 7)."""
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM

    model = build(toy, vision_connector="hive")
    model.save_pretrained(tmp_path / "saved")
    loaded = LlavaLlamaForCausalLM.from_pretrained(tmp_path / "saved", torch_dtype=dtype)
    for candidate in (loaded, build(toy, vision_connector="hive").to(dtype)):
        modules = hive_modules_of(candidate)
        kept = {
            name: param.dtype
            for name, param in modules.named_parameters()
            if name.endswith("_gate") or "_norm." in name
        }
        assert kept and set(kept.values()) == {torch.float32}, kept
        assert modules.hive_levels.projectors[0].layers[0].weight.dtype == dtype


def test_llava_mistral_with_a_hive_connector_is_refused_by_name(toy):
    """LLaVA's Mistral (and MPT) classes are not routed to HIVE's generate: refused, not half-supported."""
    apply_patch()
    from llava.model.language_model.llava_mistral import LlavaMistralConfig, LlavaMistralForCausalLM

    llama = build(toy, vision_connector="hive")
    config = LlavaMistralConfig(**{k: v for k, v in llama.config.to_dict().items() if k not in ("model_type",
                                                                                             "architectures")})  # fmt: skip
    with pytest.raises(ValueError, match=r"--vision_connector hive on LlavaMistralModel: .*Llama models"):
        LlavaMistralForCausalLM(config)


@pytest.fixture(scope="module")
def saved_by_position(toy, tmp_path_factory):
    """A LLaVA checkpoint and an `mm_projector.bin` as hive-adapter wrote them before it named a connector's blocks by
    decoder layer: `hive_blocks.<k>` for the k-th block. Returns (directory, adapter file, the trained tensors)."""
    import shutil

    model = build(toy, vision_connector="hive", hive_vision_layers="1,3,5", hive_llm_layers="0,2,3")
    assert list(hive_modules_of(model).hive_blocks) == ["0", "2", "3"]  # positions 0, 1, 2: 2 means another layer
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "hive_" in name:
                parameter.copy_(torch.randn_like(parameter) * 0.1)
    trained = {key: value.clone() for key, value in model.state_dict().items() if "mm_projector" in key}
    root = tmp_path_factory.mktemp("saved-by-position")
    old = root / "llava-old"
    model.save_pretrained(old)
    for file in toy["vicuna"].iterdir():
        if "token" in file.name:
            shutil.copy(file, old / file.name)
    rewrite_with_blocks_by_position(old)
    adapter = root / "adapter" / "mm_projector.bin"
    adapter.parent.mkdir()
    torch.save(blocks_by_position(trained), adapter)
    return old, adapter, trained


def assert_loaded(trained: dict, state: dict, route: str) -> None:
    for key, value in trained.items():  # the builder loads in float16: the same rounding as the file's values
        assert torch.equal(state[key], value.to(state[key].dtype)), (route, key)


def test_a_checkpoint_with_blocks_saved_by_position_loads_on_every_path(toy, saved_by_position):
    """Checkpoints with blocks saved by position load bit-exact by decoder layer: through `from_pretrained` plain
    (4.37 loads module by module) and with `low_cpu_mem_usage` (parameters set by name: the patched
    `from_pretrained` loads the connector again), LLaVA's builder (`load_pretrained_model`), and an
    `mm_projector.bin` (`--pretrain_mm_mlp_adapter`)."""
    from llava.model.builder import load_pretrained_model
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM

    old, adapter, trained = saved_by_position
    loaded = {
        "from_pretrained": LlavaLlamaForCausalLM.from_pretrained(old),
        "low_cpu_mem_usage": LlavaLlamaForCausalLM.from_pretrained(old, low_cpu_mem_usage=True),
        "load_pretrained_model": load_pretrained_model(str(old), None, "llava-old", device="cpu")[1],
        "mm_projector.bin": build(toy, vision_connector="hive", pretrain_mm_mlp_adapter=str(adapter)),
    }
    for route, candidate in loaded.items():
        assert_loaded(trained, candidate.state_dict(), route)


def test_the_patch_file_loads_a_checkpoint_with_blocks_saved_by_position(saved_by_position, tmp_path):
    """The same through a LLaVA checkout patched with patches/llava/*.patch (its own classes, no apply_patch)."""
    import subprocess
    import sys

    from llava_helpers import checkout_path, patched_llava_checkout

    old, _, trained = saved_by_position
    tree = patched_llava_checkout(tmp_path / "LLaVA")
    torch.save(trained, tmp_path / "trained.pt")
    script = (
        "import sys, torch, llava\n"
        "from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM\n"
        f"assert llava.__file__.startswith({str(tree)!r}), llava.__file__\n"
        f"model = LlavaLlamaForCausalLM.from_pretrained({str(old)!r}, low_cpu_mem_usage=True)\n"
        "torch.save(model.state_dict(), sys.argv[1])\n"
    )
    env = {**__import__("os").environ, "PYTHONPATH": checkout_path(tree), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "loaded.pt")], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LLaVA patched" not in result.stderr
    assert_loaded(trained, torch.load(tmp_path / "loaded.pt", weights_only=True), "patched checkout")


def test_each_model_saves_its_own_settings_in_both_of_llavas_adapter_saves(toy, tmp_path):
    """With `--tune_mm_mlp_adapter` LLaVA writes `mm_projector.bin` in `safe_save_model_for_hf_trainer` (at the end)
    and in `LLaVATrainer._save_checkpoint` (each checkpoint), from the parameters alone. Two live models with other
    HIVE settings: each file carries the settings of the model being saved, and a stage 2 started from it
    (`--pretrain_mm_mlp_adapter`) rebuilds that connector and loads it bit-exact."""
    from types import SimpleNamespace

    from hive_adapter.integrations.llava.settings import settings_in_adapter_file

    models = {
        "default": build(toy, vision_connector="hive"),
        "chosen": build(toy, vision_connector="hive", hive_vision_layers="1,3,5", hive_llm_layers="0,2,3"),
    }
    files = {}
    for name, model in models.items():
        arguments = SimpleNamespace(tune_mm_mlp_adapter=True, local_rank=-1)
        trainer = SimpleNamespace(model=model, args=arguments, deepspeed=None)
        llava_train.safe_save_model_for_hf_trainer(trainer=trainer, output_dir=str(tmp_path / name))
        args = llava_train.TrainingArguments(output_dir=str(tmp_path / f"{name}-run"), use_cpu=True, report_to="none")
        args.tune_mm_mlp_adapter = True  # LLaVA's train() copies it from its model arguments
        llava_train.LLaVATrainer(model=model, args=args)._save_checkpoint(model, trial=None)
        files[name] = [
            tmp_path / name / "mm_projector.bin",
            tmp_path / f"{name}-run" / "checkpoint-0" / "mm_projector.bin",
        ]
    assert models["default"].config.hive_config != models["chosen"].config.hive_config
    for name, model in models.items():
        trained = {key: value for key, value in model.state_dict().items() if "mm_projector" in key}
        for file in files[name]:
            assert settings_in_adapter_file(file) == model.config.hive_config, file
            weights = torch.load(file, map_location="cpu", weights_only=True)
            assert weights.keys() == trained.keys()
            stage2 = build(toy, vision_connector="hive", pretrain_mm_mlp_adapter=str(file))
            assert stage2.config.hive_config == model.config.hive_config
            for key, value in trained.items():
                assert torch.equal(stage2.state_dict()[key], value), (file, key)
