"""The correctness half of `make gpu-check`: flash-attention against SDPA with a spy proving flash ran, one training
step, packed rows under a flash language model, and the dtype audit. Each check returns a dict with `ok` and its
figures; on CPU (`dry_run`) flash-attn is the reference kernel of `benchmarks.flash_reference`, on CUDA the real
package, counted by the same spy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from .configs import TINY, ModelPair
from .dtype_audit import sensitive_dtypes
from .flash_reference import installed
from .models import build, set_stage, training_batch

FLASH = "flash_attention_2"
TOLERANCE = 2e-2  # bf16: a couple of rounding steps
REPO = Path(__file__).resolve().parent.parent


class FlashUnavailable(RuntimeError):
    """flash-attn does not import on this machine (absent, or built for another torch)."""


def _counted(function: Callable | None, calls: Counter, key: str) -> Callable | None:
    if function is None:
        return None

    def counted(*args, **kwargs):
        calls[key] += 1
        return function(*args, **kwargs)

    return counted


@contextmanager
def flash_kernels(dry_run: bool) -> Iterator[Counter]:
    """Inside: flash-attn's functions (the reference on a dry run) counted as they are called: `hive` (HIVE's
    cross-attention), `lm_varlen` / `lm_dense` (transformers' flash_attention_2 path, varlen / one row each)."""
    from transformers import modeling_flash_attention_utils as fa

    from hive_adapter.model import cross_attention

    with installed() if dry_run else nullcontext():
        hive_kernel = cross_attention.flash_varlen_function()
        if hive_kernel is None:
            raise FlashUnavailable("flash_attn does not import here (see the warning above); pip install flash-attn")
        if not dry_run:
            fa.lazy_import_flash_attention(FLASH)
        calls: Counter = Counter()
        saved = (cross_attention.flash_varlen_function, fa._flash_varlen_fn, fa._flash_fn)
        counted_hive = _counted(hive_kernel, calls, "hive")
        cross_attention.flash_varlen_function = lambda: counted_hive
        fa._flash_varlen_fn = _counted(fa._flash_varlen_fn, calls, "lm_varlen")
        fa._flash_fn = _counted(fa._flash_fn, calls, "lm_dense")
        try:
            yield calls
        finally:
            cross_attention.flash_varlen_function, fa._flash_varlen_fn, fa._flash_fn = saved


def _model(
    kernel: str, device: str, *, pair: ModelPair = TINY, gates: float | None = 0.5, stage: int = 2, dtype=torch.bfloat16
):
    torch.manual_seed(0)
    model = build(pair, "hive", device=device, dtype=dtype, attn_implementation=kernel)
    set_stage(model, "hive", stage)
    if gates is not None:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("_gate"):
                    param.fill_(gates)
    return model.train()


def _batch(device: str, *, marker_at: int, text_tokens: int = 16) -> dict:
    inputs = training_batch(TINY, "hive", batch=2, text_tokens=text_tokens, device=device, dtype=torch.bfloat16)
    ids = torch.randint(6, 100, inputs["input_ids"].shape, generator=torch.Generator().manual_seed(0)).to(device)
    ids[:, marker_at] = inputs["input_ids"][0, 0]  # the image marker
    return {**inputs, "input_ids": ids, "labels": ids}


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want||: a whole gradient's error (one bf16 entry of many may round either way)."""
    return float((got.float() - want.float()).norm() / want.float().norm().clamp(min=1e-12))


def parity(device: str, dry_run: bool) -> dict:
    """The same tiny HIVE model (vision tower, LLM and HIVE's blocks) on flash-attn and on SDPA, bf16: logits within
    2e-2 (absolute + relative); HIVE's whole gradient as close to a float32 SDPA run as SDPA's own bf16 gradient is
    (relative L2 error at most 2e-2 above SDPA's; a single small gradient that is a cancelling sum, a gate's, moves
    by a few percent under any change of bf16 rounding, even the vision tower's kernel alone: reported, not judged);
    and flash really ran for HIVE's blocks and the language model."""
    cases = {}
    for case, marker_at in (("captioning", 0), ("text before the image", 5)):
        batch = _batch(device, marker_at=marker_at)
        results = {}
        for run, kernel, dtype in (("float32", "sdpa", torch.float32), ("sdpa", "sdpa", torch.bfloat16),
                                   (FLASH, FLASH, torch.bfloat16)):  # fmt: skip
            model = _model(kernel, device, dtype=dtype)
            inputs = {**batch, "pixel_values": batch["pixel_values"].to(dtype)}
            with flash_kernels(dry_run) if kernel == FLASH else nullcontext(Counter()) as calls:
                output = model(**inputs)
                output.loss.backward()
            grads = {n: p.grad for n, p in model.named_parameters() if "hive_" in n and p.grad is not None}
            results[run] = (output.logits.detach(), grads, dict(calls))
        (reference, reference_grads, _), (sdpa, sdpa_grads, _) = results["float32"], results["sdpa"]
        flash, flash_grads, calls = results[FLASH]
        logits_close = bool(torch.allclose(flash.float(), sdpa.float(), atol=TOLERANCE, rtol=TOLERANCE))
        names = sorted(reference_grads)
        whole = {run: torch.cat([grads[n].float().flatten() for n in names]) for run, grads in
                 (("float32", reference_grads), ("sdpa", sdpa_grads), (FLASH, flash_grads))}  # fmt: skip
        flash_error, sdpa_error = (_relative(whole[run], whole["float32"]) for run in (FLASH, "sdpa"))
        excess = {
            n: _relative(flash_grads[n], want) - _relative(sdpa_grads[n], want) for n, want in reference_grads.items()
        }
        worst = max(excess, key=excess.get)
        ran = calls.get("hive", 0) > 0 and calls.get("lm_varlen", 0) + calls.get("lm_dense", 0) > 0
        cases[case] = {
            "logits_max_abs_diff_vs_sdpa": float((flash.float() - sdpa.float()).abs().max()),
            "logits_max_abs_diff_sdpa_vs_float32": float((sdpa.float() - reference.float()).abs().max()),
            "logits_close": logits_close,
            "hive_grad_error_vs_float32": {"flash": flash_error, "sdpa": sdpa_error},
            "worst_parameter_excess": {"name": worst, "excess": excess[worst]},  # information, not the verdict
            "flash_calls": calls,
            "ok": logits_close and flash_error <= sdpa_error + TOLERANCE and ran,
        }
    return {"cases": cases, "ok": all(case["ok"] for case in cases.values())}


def one_step(device: str, dry_run: bool, pair: ModelPair) -> dict:
    """One AdamW step of stage 2 under flash-attn from zero gates: a finite loss, finite gradients, every gate's
    gradient non-zero, and the gates moved."""
    model = _model(FLASH, device, pair=pair, gates=None)
    gates = {n: p for n, p in model.named_parameters() if n.endswith("_gate")}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = training_batch(pair, "hive", batch=2, text_tokens=32, device=device, dtype=torch.bfloat16)
    with flash_kernels(dry_run) as calls:
        loss = model(**batch).loss
        loss.backward()
    finite_grads = all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
    zero_gate_grads = sorted(n for n, p in gates.items() if p.grad is None or not bool(p.grad.abs().sum() > 0))
    optimizer.step()
    unmoved = sorted(n for n, p in gates.items() if not bool(p.detach().abs().sum() > 0))
    result = {
        "pair": pair.name,
        "loss": float(loss),
        "finite_loss": bool(torch.isfinite(loss)),
        "finite_gradients": finite_grads,
        "gates": len(gates),
        "gates_with_zero_gradient": zero_gate_grads,
        "gates_unmoved_after_step": unmoved,
        "gate_dtypes": sorted({str(p.dtype).replace("torch.", "") for p in gates.values()}),
        "flash_calls": dict(calls),
    }
    result["ok"] = result["finite_loss"] and finite_grads and not zero_gate_grads and not unmoved and calls["hive"] > 0
    return result


def packing(device: str, dry_run: bool) -> dict:
    """Packed rows (several per batch, `pack_rows`) under a flash language model and flash cross-attention: each
    sample's logits are the logits of that sample run alone, and the LM took the varlen kernel."""
    from hive_adapter.data.collator import pack_rows

    marker = int(training_batch(TINY, "hive", batch=1, text_tokens=2, device="cpu")["input_ids"][0, 0])
    generator = torch.Generator().manual_seed(5)
    encoded = []
    for length in (5, 9, 3, 7, 6):
        ids = [marker, *torch.randint(6, 100, (length - 1,), generator=generator).tolist()]
        encoded.append((ids, [-100, *ids[1:]]))
    size = TINY.vision["image_size"]
    pixels = torch.randn(len(encoded), 3, size, size, generator=generator).to(device, torch.bfloat16)
    packed, order = pack_rows(encoded, capacity=14, pad_token_id=0)
    packed = {name: tensor.to(device) for name, tensor in packed.items()}
    packed["pixel_values"] = pixels[order]
    model = _model(FLASH, device).eval()
    for module in model.hive_vision.tower.modules():  # the tower on SDPA: every flash call counted is the LM's
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation_internal"):
            config._attn_implementation_internal = "sdpa"
    worst = 0.0
    with torch.no_grad(), flash_kernels(dry_run) as calls:
        got = model(**packed).logits.float()
        packed_calls = dict(calls)
        position_ids = packed["position_ids"].cpu()
        starts = [(r, c) for r in range(position_ids.shape[0]) for c in range(position_ids.shape[1])
                  if c == 0 or position_ids[r, c] != position_ids[r, c - 1] + 1]  # fmt: skip
        for number, sample in enumerate(order):
            row, start = starts[number]
            ids = torch.tensor([encoded[sample][0]], device=device)
            alone = model(input_ids=ids, pixel_values=pixels[sample : sample + 1]).logits.float()[0]
            piece = got[row, start : start + len(encoded[sample][0])]
            worst = max(worst, float(((piece - alone).abs() - TOLERANCE * alone.abs()).max()))
    return {
        "rows": int(packed["input_ids"].shape[0]),
        "samples": len(encoded),
        "worst_excess_over_rtol": worst,
        "flash_calls_packed_forward": packed_calls,
        "ok": worst <= TOLERANCE and packed_calls.get("lm_varlen", 0) > 0 and packed_calls.get("lm_dense", 0) == 0,
    }


def dtype_audit(device: str) -> dict:
    """Gates and norms after `.to(bf16)` (float32), and after a one-rank DeepSpeed ZeRO-2 bf16 init and step (bf16
    in the module like every weight, a float32 master copy in ZeRO; `benchmarks.dtype_audit`, its own process)."""
    cast = sorted(set(sensitive_dtypes(build(TINY, "hive", device=device).to(torch.bfloat16)).values()))
    result: dict = {"to_bf16_gates_and_norms": cast}
    try:
        import deepspeed  # noqa: F401
    except Exception as error:  # noqa: BLE001  (absent, or broken for this torch)
        result["deepspeed_zero2_bf16"] = f"skipped: deepspeed does not import ({error!r})"
        result["ok"] = cast == ["float32"]
        return result
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.dtype_audit", "--device", device],
        capture_output=True, text=True, env=env, timeout=300, cwd=REPO,
    )  # fmt: skip
    if run.returncode:
        result["deepspeed_zero2_bf16"] = f"failed: {run.stderr[-2000:]}"
        result["ok"] = False
        return result
    audit = json.loads(run.stdout.strip().splitlines()[-1])["deepspeed_zero2_bf16"]
    init = audit["after_init"]
    result["deepspeed_zero2_bf16"] = audit
    result["ok"] = (
        cast == ["float32"]
        and init["zero_flat_groups"] == init["other_trainable"] == ["bfloat16"]
        and audit["step"]["loss_finite"]
        and audit["step"]["gate_master_copy"] != init["gate_master_copy"]
    )
    return result
