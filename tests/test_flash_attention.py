"""The flash-attention paths on CPU, through a reference kernel with flash-attn's own argument checks
(`benchmarks/flash_reference.py`), compared with SDPA, forward and gradients; and what SDPA is handed on CUDA."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from tiny_models import IMAGE_TOKEN, build_text, build_vision, set_gates, text_ids, vision_inputs

import hive_adapter as hive
from benchmarks.flash_reference import flash_attn_varlen_func, installed, use_flash_language_model
from hive_adapter.data.collator import pack_rows
from hive_adapter.model import cross_attention
from hive_adapter.model.cross_attention import HiveCrossAttention, HiveCrossAttentionBlock
from hive_adapter.model.splice import IGNORE_INDEX

BF16 = dict(atol=2e-2, rtol=2e-2)


def packed_qkv(lengths=(3, 5), heads=4, kv_heads=2, head_dim=8, dtype=torch.bfloat16):
    total = sum(lengths)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(total, h, head_dim, generator=generator).to(dtype) for h in (heads, kv_heads, kv_heads))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu, max(lengths)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: {**a, "q": a["q"].float(), "k": a["k"].float(), "v": a["v"].float()}, "fp16 and bf16"),
        (lambda a: {**a, "k": a["k"].half()}, "same dtype"),
        (lambda a: {**a, "cu_seqlens_q": a["cu_seqlens_q"].long()}, "int32"),
        (lambda a: {**a, "q": torch.randn(8, 4, 16, 2).to(torch.bfloat16)[..., 0]}, "contiguous last dimension"),
        (lambda a: {**a, "max_seqlen_q": 2}, "shorter than the longest"),
    ],
)
def test_the_reference_kernel_refuses_what_flash_attn_refuses(change, message):
    q, k, v, cu, longest = packed_qkv()
    arguments = dict(q=q, k=k, v=v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=longest, max_seqlen_k=longest)
    with pytest.raises(RuntimeError, match=message):
        flash_attn_varlen_func(**change(arguments))
    big = torch.zeros(4, 2, 264, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="at most 256"):
        flash_attn_varlen_func(big, big, big, cu[:2].clamp(max=4), cu[:2].clamp(max=4), 4, 4)


def test_the_reference_kernel_is_sdpa_per_sequence():
    q, k, v, cu, longest = packed_qkv()
    out = flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, causal=True)
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        want = F.scaled_dot_product_attention(
            *(t[start:end].transpose(0, 1).float() for t in (q, k, v)), is_causal=True, enable_gqa=True
        ).transpose(0, 1)
        torch.testing.assert_close(out[start:end].float(), want, **BF16)


def block_pair():
    """The same gated block with the SDPA and the flash kernel, bf16, grouped K/V heads."""
    blocks = []
    for kernel in ("sdpa", "flash_attention_2"):
        torch.manual_seed(0)
        attention = HiveCrossAttention(
            hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, media_size=24, implementation=kernel
        )
        block = HiveCrossAttentionBlock(attention, use_ffn=True, gate_init=0.5).to(torch.bfloat16)
        blocks.append(block)
    return blocks


def test_a_block_under_flash_equals_sdpa_with_padded_keys_and_text_before_the_image():
    """Sample 1's last three keys are padding (no query sees them); the first two rows of each sample come before
    the image (has_media False). The flash kernel must run (the spy) and match SDPA, forward and gradients."""
    batch, text, keys = 2, 6, 8
    visible = torch.ones(batch, text, keys, dtype=torch.bool)
    visible[1, :, 5:] = False
    has_media = torch.ones(batch, text, dtype=torch.bool)
    has_media[:, :2] = False
    visible[:, :2] = False
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(batch, text, 32, generator=generator).to(torch.bfloat16)
    media = torch.randn(batch, keys, 24, generator=generator).to(torch.bfloat16)
    results = []
    with installed() as calls:
        for block in block_pair():
            out, _, _ = block(hidden, media, visible, has_media)
            out.float().square().sum().backward()
            results.append((out, {name: p.grad.float() for name, p in block.named_parameters()}))
    assert calls["varlen"] == 1  # the flash block ran flash-attn's varlen kernel, once
    (sdpa, sdpa_grads), (flash, flash_grads) = results
    torch.testing.assert_close(flash.float(), sdpa.float(), **BF16)
    torch.testing.assert_close(flash[:, :2], hidden[:, :2])  # text before the image: exactly unchanged
    for name, grad in sdpa_grads.items():
        torch.testing.assert_close(flash_grads[name], grad, atol=5e-2, rtol=5e-2, msg=name)


def hive_model(kernel: str, *, image_token_id=None, dtype=torch.bfloat16):
    config = hive.HiveConfig(
        vision_layers=[1, 3],
        llm_layers=[1, 3],
        tokens_per_level=4,
        use_ffn=True,
        image_token_id=image_token_id,
        cross_attn_implementation=kernel,
    )
    torch.manual_seed(0)
    model = hive.HiveForConditionalGeneration.from_vision_text(build_vision("clip"), build_text("llama"), config)
    set_gates(model, 0.7)
    return model.to(dtype).train()


@pytest.mark.parametrize("case", ["captioning, left padding", "text before the image"])
def test_hive_flash_equals_sdpa_forward_and_gradients(case):
    ids = text_ids(2, 10, marker_at=None if case.startswith("captioning") else 4)
    marker = None if case.startswith("captioning") else IMAGE_TOKEN
    mask = torch.ones_like(ids)
    if case.startswith("captioning"):
        mask[1, :3] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, IGNORE_INDEX)}
    batch["pixel_values"] = vision_inputs("clip", 2)["pixel_values"].to(torch.bfloat16)
    results = {}
    with installed() as calls:
        for kernel in ("sdpa", "flash_attention_2"):
            model = hive_model(kernel, image_token_id=marker)
            output = model(**batch)
            output.loss.backward()
            grads = {n: p.grad.float() for n, p in model.named_parameters() if "hive_" in n and p.grad is not None}
            results[kernel] = output.logits.float(), grads
    assert calls["varlen"] == 2  # one call per HIVE block, both blocks on flash
    (sdpa, sdpa_grads), (flash, flash_grads) = results["sdpa"], results["flash_attention_2"]
    keep = mask.bool()
    torch.testing.assert_close(flash[keep], sdpa[keep], atol=5e-2, rtol=5e-2)
    assert sdpa_grads.keys() == flash_grads.keys() and any("gate" in name for name in sdpa_grads)
    for name, grad in sdpa_grads.items():
        scale = grad.abs().max().clamp(min=1e-3)
        assert float((flash_grads[name] - grad).abs().max() / scale) < 0.1, name


def test_packed_rows_under_a_flash_language_model_equal_the_padded_batch():
    """Issue 43, item 2: several packed rows per batch under attn_implementation="flash_attention_2" (the LM's
    self-attention and HIVE's cross-attention both through the flash kernel): each sample's logits are its padded
    row's, so no sample attends to another."""
    lengths = [5, 9, 3, 7, 6]
    generator = torch.Generator().manual_seed(5)
    encoded = []
    for length in lengths:
        ids = torch.randint(1, IMAGE_TOKEN - 1, (length,), generator=generator).tolist()
        encoded.append((ids, [IGNORE_INDEX, *ids[1:]]))
    pixels = vision_inputs("clip", len(lengths))["pixel_values"].to(torch.bfloat16)
    packed, order = pack_rows(encoded, capacity=14, pad_token_id=0)
    assert packed["input_ids"].shape[0] >= 2  # several packed rows: the case transformers does not see alone
    packed["pixel_values"] = pixels[order]
    model = hive_model("flash_attention_2")
    use_flash_language_model(model.language_model)
    with installed() as calls, torch.no_grad():
        got = model(**packed).logits.float()
        assert calls["varlen"] > 0 and calls["dense"] == 0  # the LM ran the varlen kernel on the packed rows
        for position, sample in enumerate(order):
            row, start = locate(packed["position_ids"], position)
            ids = torch.tensor([encoded[sample][0]])
            alone = model(input_ids=ids, pixel_values=pixels[sample : sample + 1]).logits.float()[0]
            torch.testing.assert_close(got[row, start : start + lengths[sample]], alone, **BF16)


def locate(position_ids: torch.Tensor, number: int) -> tuple[int, int]:
    """(row, column) where the `number`-th packed sample (row-major) starts."""
    starts = [(row, column) for row in range(position_ids.shape[0]) for column in range(position_ids.shape[1])
              if column == 0 or position_ids[row, column] != position_ids[row, column - 1] + 1]  # fmt: skip
    return starts[number]


def test_sdpa_never_gets_grouped_heads_with_a_mask(monkeypatch):
    """Issue 42, finding 1: `enable_gqa=True` with a boolean mask leaves CUDA only the math kernel. A masked call
    gets K/V expanded to the query heads; an all-visible call gets no mask (and grouped heads)."""
    seen = []
    real = F.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, **kwargs):
        seen.append((attn_mask is not None, kwargs.get("enable_gqa", False), key.shape[1] == query.shape[1]))
        return real(query, key, value, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    (block, _) = block_pair()
    block = block.float()
    hidden, media = torch.randn(2, 5, 32), torch.randn(2, 8, 24)
    everywhere = torch.ones(2, 5, 8, dtype=torch.bool)
    some = everywhere.clone()
    some[0, :, 6:] = False
    media_rows = torch.ones(2, 5, dtype=torch.bool)
    masked, _, _ = block(hidden, media, some, media_rows)
    block(hidden, media, everywhere, media_rows)
    assert seen == [(True, False, True), (False, True, False)]
    block.attn.implementation = "eager"
    reference, _, _ = block(hidden, media, some, media_rows)
    torch.testing.assert_close(masked, reference, atol=1e-5, rtol=1e-5)


def test_an_importable_but_broken_flash_attn_falls_back_to_sdpa(tmp_path, monkeypatch, caplog):
    """Issue 42, finding 4: a flash_attn wheel built for another torch fails at import; HIVE must fall back."""
    package = tmp_path / "flash_attn"
    package.mkdir()
    (package / "__init__.py").write_text(
        "raise ImportError('flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDeviceEi')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    monkeypatch.setattr(cross_attention, "FLASH_DEVICE_TYPES", ("cuda", "cpu"))
    cross_attention.flash_varlen_function.cache_clear()
    try:
        assert cross_attention.flash_varlen_function() is None
        assert "does not load" in caplog.text and "undefined symbol" in caplog.text
        sdpa, flash = block_pair()
        hidden, media = torch.randn(2, 5, 32).to(torch.bfloat16), torch.randn(2, 8, 24).to(torch.bfloat16)
        visible, rows = torch.ones(2, 5, 8, dtype=torch.bool), torch.ones(2, 5, dtype=torch.bool)
        torch.testing.assert_close(flash(hidden, media, visible, rows)[0], sdpa(hidden, media, visible, rows)[0])
    finally:
        cross_attention.flash_varlen_function.cache_clear()


def test_flash_is_chosen_only_for_what_flash_attn_accepts():
    """Issue 42, finding 4: head_dim <= 256 and K/V in the query's dtype, besides fp16/bf16 and per-sample keys."""
    visible = torch.ones(1, 3, 4, dtype=torch.bool)
    query = torch.zeros(1, 2, 3, 8, dtype=torch.bfloat16)
    key = torch.zeros(1, 1, 4, 8, dtype=torch.bfloat16)
    with installed():
        assert cross_attention._flash_plan(query, key, key, visible) is not None
        assert cross_attention._flash_plan(query, key.float(), key.float(), visible) is None
        wide = torch.zeros(1, 2, 3, 264, dtype=torch.bfloat16)
        assert (
            cross_attention._flash_plan(wide, key.new_zeros(1, 1, 4, 264), key.new_zeros(1, 1, 4, 264), visible) is None
        )
        assert cross_attention._flash_plan(query.float(), key.float(), key.float(), visible) is None
        per_query = visible.clone()
        per_query[0, 0, 3] = False
        assert cross_attention._flash_plan(query, key, key, per_query) is None


def test_set_attn_implementation_reaches_hives_blocks():
    """Issue 42, finding 4: the kernel was fixed when the blocks were built."""
    model = hive_model(None, dtype=torch.float32)
    kernels = lambda: {m.implementation for m in model.modules() if isinstance(m, HiveCrossAttention)}  # noqa: E731
    assert kernels() == {"sdpa"}
    model.set_attn_implementation("eager")
    assert model.language_model.config._attn_implementation == "eager" and kernels() == {"eager"}
    model.set_attn_implementation("sdpa")
    assert kernels() == {"sdpa"}


def test_the_sdpa_blocks_read_visibility_once_per_forward_not_once_per_block(monkeypatch):
    """Host syncs: choosing SDPA's mask-free call reads `visible.all()` once per forward, shared by every block."""
    reads = []
    real = torch.Tensor.__bool__
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda tensor: reads.append(1) or real(tensor))
    counts = {}
    for layers in ([1, 3], [0, 1, 2, 3]):
        config = hive.HiveConfig(vision_layers=[0, 1, 2, 3][: len(layers)], llm_layers=layers, tokens_per_level=4)
        torch.manual_seed(0)
        model = hive.HiveForConditionalGeneration.from_vision_text(build_vision("clip"), build_text("llama"), config)
        batch = {"input_ids": text_ids(2, 8), **vision_inputs("clip", 2)}
        model(**batch)  # warm-up (lazy initialisations read tensors too)
        reads.clear()
        model(**batch)
        counts[len(layers)] = len(reads)
    assert counts[4] == counts[2], counts


def test_packed_rows_under_a_flash_language_model_equal_the_padded_batch_for_concat():
    """concat splices each sample's image tokens into its packed row: the boundaries handed to flash-attn are the
    spliced rows' (the loss equals the padded batch's, whose flash path unpads by the attention mask)."""
    from test_packing import packed_and_padded, samples

    encoded = samples()
    pixels = vision_inputs("clip", len(encoded))["pixel_values"].to(torch.bfloat16)
    reference, packed, _ = packed_and_padded(encoded, pixels, capacity=14)
    config = hive.HiveConfig(connector="concat", vision_layers=[1, 3], tokens_per_level=4)
    torch.manual_seed(0)
    model = hive.HiveForConditionalGeneration.from_vision_text(build_vision("clip"), build_text("llama"), config)
    model = model.to(torch.bfloat16).eval()
    use_flash_language_model(model.language_model)
    with installed() as calls, torch.no_grad():
        want = model(**reference).loss
        calls.clear()
        got = model(**packed).loss
    torch.testing.assert_close(got.float(), want.float(), atol=1e-3, rtol=1e-3)  # before the fix: off by 0.018
    assert calls["varlen"] > 0 and calls["dense"] == 0
