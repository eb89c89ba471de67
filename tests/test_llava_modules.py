"""The LLaVA integration's HIVE modules (`HiveLlavaModules`) in a LLaVA-shaped model built without the LLaVA repo:
block names, checkpoints written before, PEFT's `modules_to_save`, the settings a saved adapter carries.

`TinyLlavaModel` is LLaVA's `LlavaLlamaModel` in miniature: the decoder stack with the vision tower and the
connector (`mm_projector`) beside it, so every state-dict key reads as in a LLaVA checkpoint.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import _TEXT_COMMON, build_vision, set_gates
from transformers import LlamaConfig, LlamaModel

from hive_adapter import HiveConfig
from hive_adapter.integrations.llava.modules import HiveLlavaModules, hive_modules_of
from hive_adapter.integrations.llava.settings import hive_llava_settings

M = -200  # LLaVA's IMAGE_TOKEN_INDEX
LLM_LAYERS = (0, 2, 3)  # positions 0, 1, 2: old and new names overlap (0 and 2) and disagree (2 is layer 3)


class TinyLlavaModel(LlamaModel):
    def __init__(self, config):
        super().__init__(config)
        self.vision_tower = build_vision("clip")
        self.mm_projector = HiveLlavaModules(config)
        self.mm_projector.attach(self)

    def get_vision_tower(self):
        return self.vision_tower


def llava_config(**hive) -> LlamaConfig:
    config = LlamaConfig(**_TEXT_COMMON)
    settings = {"vision_layers": [1, 2, 3], "llm_layers": list(LLM_LAYERS), **hive}
    config.hive_config = hive_llava_settings(HiveConfig(**settings), build_vision("clip").config, 4)
    config.mm_projector_type = "hive"
    return config


def build(seed: int = 0, **hive) -> TinyLlavaModel:
    torch.manual_seed(seed)
    model = TinyLlavaModel(llava_config(**hive)).eval()
    with torch.no_grad():  # every HIVE tensor distinct, so a block loaded into the wrong layer shows
        for name, param in model.named_parameters():
            if "hive_" in name:
                param.copy_(torch.randn_like(param) * 0.1)
    return model


def by_position(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """`state` as hive-adapter wrote it before blocks were named by decoder layer: `hive_blocks.<k>` for the k-th
    block (an `nn.ModuleList`)."""
    out = {}
    head = prefix + "hive_blocks."
    for key, value in state.items():
        if key.startswith(head):
            layer, rest = key[len(head) :].split(".", 1)
            key = f"{head}{LLM_LAYERS.index(int(layer))}.{rest}"
        out[key] = value
    return out


def test_blocks_are_named_by_their_decoder_layer():
    model = build()
    blocks = {key.split(".")[2] for key in model.state_dict() if key.startswith("mm_projector.hive_blocks.")}
    assert blocks == {str(layer) for layer in LLM_LAYERS}
    assert list(model.mm_projector.hive_blocks) == [str(layer) for layer in LLM_LAYERS]


@pytest.mark.parametrize("route", ["full model", "mm_projector.bin"])
def test_a_checkpoint_with_blocks_named_by_position_loads_bit_exact(route):
    """A full LLaVA checkpoint (`model.load_state_dict`, as transformers 4.37 and LLaVA's builder load one) and an
    adapter file (`mm_projector.load_state_dict(get_w(weights, 'mm_projector'))`) written with `hive_blocks.<k>`."""
    trained = build(seed=0)
    fresh = build(seed=1)
    if route == "full model":
        fresh.load_state_dict(by_position(trained.state_dict(), "mm_projector."))
    else:
        # LLaVA's get_w(weights, 'mm_projector'): the keys below `mm_projector.`
        adapter = {k.split("mm_projector.")[1]: v for k, v in trained.state_dict().items() if "mm_projector." in k}
        fresh.mm_projector.load_state_dict(by_position(adapter, ""))
    for key, value in trained.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    for layer in LLM_LAYERS:
        assert torch.equal(
            fresh.mm_projector.hive_blocks[str(layer)].hive_attn_gate,
            trained.mm_projector.hive_blocks[str(layer)].hive_attn_gate,
        )


def test_todays_names_load_unchanged_and_a_mixture_is_refused():
    trained, fresh = build(seed=0), build(seed=1)
    fresh.load_state_dict(trained.state_dict())
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in trained.state_dict().items())
    mixed = trained.state_dict()
    mixed["mm_projector.hive_blocks.1.hive_attn_gate"] = mixed["mm_projector.hive_blocks.0.hive_attn_gate"]
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*hive_blocks\.1\.hive_attn_gate"):
        build(seed=1).load_state_dict(mixed)


def images(count: int) -> torch.Tensor:
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_a_block_peft_keeps_in_modules_to_save_runs_as_its_trainable_copy():
    """PEFT's `modules_to_save` puts a wrapper where the block was (`mm_projector.hive_blocks.<layer>`): the decoder
    layer's hook looks the block up on each call, so the trainable copy runs, not the frozen original."""
    from peft import LoraConfig, get_peft_model

    model = build()
    set_gates(model, 0.5)
    names = [f"mm_projector.hive_blocks.{layer}" for layer in LLM_LAYERS]
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=names))
    modules = hive_modules_of(model)
    ids = torch.tensor([[1, M, 5, 6, 7, 8]])
    text, *_ = modules.prepare_inputs(model, ids, None, None, None, None, images(1), padding_side="right")
    peft_model(input_ids=text).last_hidden_state.square().mean().backward()
    for layer in LLM_LAYERS:
        wrapper = modules.hive_blocks[str(layer)]
        assert wrapper.modules_to_save["default"].hive_attn_gate.grad.abs().item() > 0, layer
        assert wrapper.original_module.hive_attn_gate.grad is None, layer


def saved_by_position(directory) -> None:
    """Rewrite a checkpoint saved by `save_pretrained` (one safetensors file or shards with their index) the way
    hive-adapter wrote it before: blocks named by position."""
    import json

    from safetensors.torch import load_file, save_file

    index = directory / "model.safetensors.index.json"
    for file in sorted(directory.glob("*.safetensors")):
        save_file(by_position(load_file(file), "mm_projector."), file, metadata={"format": "pt"})
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = by_position(data["weight_map"], "mm_projector.")
        index.write_text(json.dumps(data))


@pytest.mark.parametrize("shards", ["one file", "sharded"])
def test_a_full_checkpoint_with_blocks_named_by_position_loads_through_from_pretrained(tmp_path, shards):
    """transformers 5's `from_pretrained` sets parameters by name (no module hook sees the keys): the blocks saved by
    position are loaded again by decoder layer afterwards (what the LLaVA patch does after `from_pretrained`)."""
    from hive_adapter.integrations.llava.legacy import reload_blocks_saved_by_position

    trained = build(seed=0)
    trained.save_pretrained(tmp_path, max_shard_size="40KB" if shards == "sharded" else "5GB")
    assert (tmp_path / "model.safetensors.index.json").exists() == (shards == "sharded")
    saved_by_position(tmp_path)
    loaded = TinyLlavaModel.from_pretrained(tmp_path)
    # transformers put position 2's tensors into layer 2 and initialised layer 3 afresh
    assert not torch.equal(
        loaded.mm_projector.hive_blocks["2"].hive_attn_gate, trained.mm_projector.hive_blocks["2"].hive_attn_gate
    )
    assert reload_blocks_saved_by_position(loaded, tmp_path)
    for key, value in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    trained.save_pretrained(tmp_path / "today")
    assert not reload_blocks_saved_by_position(TinyLlavaModel.from_pretrained(tmp_path / "today"), tmp_path / "today")


def llava_train():
    """LLaVA's `llava.train.train` with `apply_patch()` (skipped where the LLaVA repo is not installed)."""
    pytest.importorskip("llava")
    from hive_adapter.integrations.llava import apply_patch

    apply_patch()
    import llava.train.train

    return llava.train.train


def save_adapter(model, directory) -> dict[str, torch.Tensor]:
    """`mm_projector.bin` as LLaVA's `--tune_mm_mlp_adapter` saves it (`safe_save_model_for_hf_trainer`)."""
    from types import SimpleNamespace

    arguments = SimpleNamespace(tune_mm_mlp_adapter=True, local_rank=-1)
    trainer = SimpleNamespace(model=model, args=arguments, deepspeed=None)
    llava_train().safe_save_model_for_hf_trainer(trainer=trainer, output_dir=str(directory))
    return torch.load(directory / "mm_projector.bin", map_location="cpu", weights_only=True)


def test_two_models_save_their_own_settings_and_the_adapter_file_round_trips(tmp_path):
    """Two live LLaVA models with different HIVE settings: each adapter file carries its own model's settings (found
    in the model being saved, not in a registry of live modules), and loads back bit-exact."""
    from hive_adapter.integrations.llava.settings import SETTINGS_PARAMETER, encode_settings, settings_in_adapter_file

    first, second = build(seed=0), build(seed=1, media_attention="all_previous")
    saved = {"first": save_adapter(first, tmp_path / "first"), "second": save_adapter(second, tmp_path / "second")}
    for name, model in (("first", first), ("second", second)):
        weights = saved[name]
        hive = {key for key, _ in model.named_parameters() if "mm_projector" in key}
        assert weights.keys() == hive | {f"mm_projector.{SETTINGS_PARAMETER}"}
        assert torch.equal(weights[f"mm_projector.{SETTINGS_PARAMETER}"], encode_settings(model.config.hive_config))
        assert settings_in_adapter_file(tmp_path / name / "mm_projector.bin") == model.config.hive_config
    assert saved["first"]["mm_projector.hive_settings"].shape != saved["second"]["mm_projector.hive_settings"].shape

    fresh = build(seed=2)
    fresh.mm_projector.load_state_dict({key.split("mm_projector.")[1]: value for key, value in saved["first"].items()})
    for key, value in first.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    with pytest.raises(ValueError, match="media_attention: weights 'previous', model 'all_previous'"):
        second.mm_projector.load_state_dict({k.split("mm_projector.")[1]: v for k, v in saved["first"].items()})


def test_a_copy_of_a_model_saves_its_settings_too(tmp_path):
    """`copy.deepcopy` builds modules without running `__init__` (a registry filled there never sees them)."""
    import copy

    model = build(seed=0, media_attention="all_previous")
    weights = save_adapter(copy.deepcopy(model), tmp_path)
    assert torch.equal(weights["mm_projector.hive_settings"], model.mm_projector.hive_settings)


def test_settings_are_added_from_the_model_being_saved_and_not_from_bare_parameters():
    """`add_projector_settings(state, model)`; the (name, parameter) pairs of LLaVA checkouts patched before name no
    model: the file is saved without the settings (the config.json beside it has them), with a warning."""
    from hive_adapter.integrations.llava.settings import add_projector_settings

    model = build(seed=0)
    state = {key: value.detach().clone() for key, value in model.named_parameters() if "mm_projector" in key}
    assert torch.equal(
        add_projector_settings(dict(state), model)["mm_projector.hive_settings"], model.mm_projector.hive_settings
    )
    assert "model.mm_projector.hive_settings" not in add_projector_settings(dict(state), model)
    assert add_projector_settings({}, model) == {}  # LLaVA's own connector's file, or no HIVE weights in it
    with pytest.warns(FutureWarning, match="re-apply patches/llava"):
        assert add_projector_settings(dict(state), list(model.named_parameters())).keys() == state.keys()
