"""HIVE served by vLLM at real shapes, against what concat's language model does for the same picture (vLLM's world).

    .venv-vllm/bin/python -m benchmarks.vllm_serving                     # 1 / 8 / 32 concurrent requests
    .venv-vllm/bin/python -m benchmarks.vllm_serving --clients 1 8 --rounds 1

The model is built here with random weights at real shapes: a SigLIP-B-shaped encoder (12 layers x 768, 224 px in
16 px patches: 196 image tokens) and a SmolLM2-135M-shaped Llama (30 layers x 576, 9 heads of 64, 3 K/V heads);
HIVE reads 3 levels (encoder layers 4, 8, 12; 196 tokens each, unpooled) through cross-attention in decoder layers
1, 11, 21 (HiveConfig's defaults). A `hive` request is one 224 px picture and a one-line question. The other side
should be vLLM's own `LlavaForConditionalGeneration` on the same encoder and LM, but it does not load on the CPU
build: vllm/model_executor/models/llava.py imports vllm/model_executor/models/pixtral.py, which imports
transformers' image_processing_pixtral, which imports torchvision, and the only torchvision for torch 2.13 on the
registry (0.28.0) is built for the CUDA torch ("operator torchvision::nms does not exist"). So the other side here
is `lm+196`, the same engine's language model on the same question with 196 more prompt tokens and no picture: what
concat's LM computes for one image, *without* concat's vision tower and projector (concat costs more than this).
Every request generates exactly `--new_tokens` tokens (greedy, EOS ignored). Per side and concurrency: requests/s
and output tokens/s (wall clock over `--rounds` waves of `clients` requests at once, each hive request its own
picture) and the mean time to first token (vLLM's per-request metric). float32, eager, one engine for both sides
(vLLM runs HIVE as an encoder-decoder model: no chunked prefill, no prefix caching). Run it on a quiet machine.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from hive_adapter.utils.flags import FullFlagParser

QUESTION = "USER: <image>\nwhat is in the picture ? ASSISTANT:"


def vision_config():
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              image_size=224, patch_size=16)  # fmt: skip


def text_config(vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                       num_key_value_heads=3, vocab_size=vocab_size, max_position_embeddings=2048,
                       tie_word_embeddings=True)  # fmt: skip


def build_models(directory: Path) -> dict[str, Path]:
    """`directory/hive`, with its processor."""
    import torch
    from transformers import SiglipVisionModel

    import hive_adapter as hive
    from hive_adapter.data.synthetic import caption_vocabulary
    from hive_adapter.tools.toy_models import word_tokenizer

    try:
        from transformers import SiglipImageProcessorPil as SiglipImageProcessor
    except ImportError:
        from transformers import SiglipImageProcessor
    from transformers import LlamaForCausalLM

    tokenizer = word_tokenizer(caption_vocabulary())
    marker = tokenizer.convert_tokens_to_ids("<image>")
    images = SiglipImageProcessor(size={"height": 224, "width": 224}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    torch.manual_seed(0)
    paths = {"hive": directory / "hive"}
    model = hive.HiveForConditionalGeneration.from_vision_text(
        SiglipVisionModel(vision_config()), LlamaForCausalLM(text_config(len(tokenizer))),
        hive.HiveConfig(image_token_id=marker),
    )  # fmt: skip
    model.save_pretrained(paths["hive"])
    hive.HiveProcessor.for_model(model, tokenizer=tokenizer, image_processor=images).save_pretrained(paths["hive"])
    return paths


def measure(path: Path, clients: list[int], rounds: int, new_tokens: int) -> dict[str, list[dict]]:
    import numpy as np
    from PIL import Image
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(path), dtype="float32", enforce_eager=True, max_model_len=512, max_num_seqs=max(clients),
              enable_prefix_caching=False, disable_log_stats=False, seed=0)  # fmt: skip
    generator = np.random.default_rng(0)
    params = SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True, temperature=0.0,
                            detokenize=False)  # fmt: skip

    tokenizer = llm.get_tokenizer()
    question = tokenizer.encode(QUESTION.replace("<image>\n", ""))
    filler = tokenizer.convert_tokens_to_ids("a")

    def prompt(side: str) -> dict:
        if side == "hive":
            picture = Image.fromarray(generator.integers(0, 256, (224, 224, 3), dtype=np.uint8))
            return {"prompt": QUESTION, "multi_modal_data": {"image": picture}}
        return {"prompt_token_ids": question[:3] + [filler] * 196 + question[3:]}  # the image's 196 tokens

    def wave(side: str, count: int):
        prompts = [prompt(side) for _ in range(count)]
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - start, outputs

    wave("hive", 1), wave("lm+196", 1)  # warm-up
    rows = {"hive": [], "lm+196": []}
    for count in clients:
        for side in ("hive", "lm+196", "hive", "lm+196")[: 2 * rounds]:  # alternating: drift hits both
            elapsed, outputs = wave(side, count)
            rows[side].append({"clients": count, "seconds": elapsed, "requests": count,
                               "ttfts": [output.metrics.first_token_latency for output in outputs],
                               "tokens": sum(len(output.outputs[0].token_ids) for output in outputs)})  # fmt: skip
    llm.llm_engine.engine_core.shutdown()
    return {side: [summary([row for row in side_rows if row["clients"] == count]) for count in clients]
            for side, side_rows in rows.items()}  # fmt: skip


def summary(waves: list[dict]) -> dict:
    seconds = sum(wave["seconds"] for wave in waves)
    return {
        "clients": waves[0]["clients"],
        "requests_per_s": sum(wave["requests"] for wave in waves) / seconds,
        "ttft_ms": 1000 * statistics.mean(t for wave in waves for t in wave["ttfts"]),
        "output_tokens_per_s": sum(wave["tokens"] for wave in waves) / seconds,
    }


def render(results: dict[str, list[dict]], command: str) -> str:
    lines = [
        "# HIVE in vLLM against concat's language-model work (lm+196), CPU",
        "",
        f"`{command}`: SigLIP-B-shaped encoder (196 image tokens) + SmolLM2-135M-shaped Llama, random weights, float32.",
        "lm+196: the same engine's LM with 196 more prompt tokens and no picture (concat without its vision tower;",
        "vLLM's own LLaVA does not load on the CPU build: see benchmarks/vllm_serving.py).",
        "",
        "| clients | hive req/s | lm+196 req/s | hive / lm+196 | hive TTFT ms | lm+196 TTFT ms | hive tok/s | lm+196 tok/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for hive_row, concat_row in zip(results["hive"], results["lm+196"], strict=True):
        lines.append(
            f"| {hive_row['clients']} | {hive_row['requests_per_s']:.3f} | {concat_row['requests_per_s']:.3f} | "
            f"{hive_row['requests_per_s'] / concat_row['requests_per_s']:.2f}x | {hive_row['ttft_ms']:.0f} | "
            f"{concat_row['ttft_ms']:.0f} | {hive_row['output_tokens_per_s']:.1f} | "
            f"{concat_row['output_tokens_per_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    import sys

    parser = FullFlagParser(prog="python -m benchmarks.vllm_serving", description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", default="benchmarks/results/vllm")
    parser.add_argument("--models_dir", default="outputs/vllm_serving_models")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--new_tokens", type=int, default=16)
    args = parser.parse_args(argv)
    paths = build_models(Path(args.models_dir))
    results = measure(paths["hive"], args.clients, args.rounds, args.new_tokens)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.vllm_serving " + " ".join(sys.argv[1:] if argv is None else argv)
    (output / "vllm_serving.json").write_text(json.dumps({"command": command, "results": results}, indent=1))
    (output / "vllm_serving.md").write_text(render(results, command.strip()))
    print(render(results, command.strip()))


if __name__ == "__main__":
    main()
