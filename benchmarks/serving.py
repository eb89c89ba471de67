"""Serving throughput: HIVE against the concat baseline through `hive-serve` (transformers serve), one run.

    python -m benchmarks.serving                 # both models, 1 and 8 clients (~4 min on 2 cores)
    python -m benchmarks.serving --requests 8    # fewer requests per setting

Both models share one vision encoder and one language model (the toy SigLIP, 64x64 images, 8 layers x 64, 64
patches; the toy Llama, 4 layers x 96) and differ only in the connector, at its defaults: HIVE reads 4 levels
(layers 2, 4, 6, 8; 64 patch tokens each, unpooled) through cross-attention in decoder layers 1-4; concat
splices the deepest level's 64 patch tokens into the sequence at the image marker. Each model is served by its own
`hive-serve` process on loopback; a request is one chat message with one 64x64 PNG (a `data:` URL) and a
one-line question, and asks for exactly 16 new tokens (greedy, `min_new_tokens` = `max_new_tokens`), so both
sides do the same decoding work. Per model and client count: requests/s (wall clock over all requests of that
setting) and time to first token (streamed: from sending the request to the first content chunk). The settings
alternate between the models (hive, concat, hive, concat, ...) so that drift in the machine's speed hits both.
Each server runs one torch thread. Run it on a quiet machine: with another job on the same cores, requests that
take 0.2 s alone took 3 s (measured while writing this benchmark), and the table means nothing.

What the ratio means: at these widths (64 and 96) a decoding step costs what its modules cost to call, not what
they compute. HIVE adds a gated cross-attention block to each of the 4 decoder layers (4 more attention calls per
new token, against 64 image keys each), while concat's image is 64 more cached positions of self-attention that
each step reads at no extra call; so HIVE's `generate` is slower here (measured alone, in process, next to the
table), and the server adds the same fixed overhead (HTTP, image decoding, the chat template) to both. It is the
end-to-end effect at this size, not the saving the paper measures: at a real size (a 1B LM, 576 image tokens at
384 px) concat's prompt carries every image token through every layer and HIVE's does not. The GPU check should
add the same table at that size.
"""

from __future__ import annotations

import base64
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hive_adapter.utils.flags import FullFlagParser

OUTPUT = Path(__file__).parent / "results" / "serving"
CONNECTORS = ("hive", "concat")
CLIENTS = (1, 8)
NEW_TOKENS = 16
QUESTION = "what shape is it ?"


def build_models(directory: Path) -> dict[str, Path]:
    """The two served models: one toy SigLIP + toy Llama, composed with each connector, marker mode."""
    import torch
    from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer

    import hive_adapter as hive
    from hive_adapter.data.synthetic import caption_vocabulary
    from hive_adapter.model.loading import load_vision_encoder
    from hive_adapter.tools.toy_models import write_toy_models

    vision_dir, language_dir = write_toy_models(directory / "toy", caption_vocabulary() + QUESTION.split())
    tokenizer = AutoTokenizer.from_pretrained(language_dir)
    image_processor = AutoImageProcessor.from_pretrained(vision_dir)
    served = {}
    for connector in CONNECTORS:
        torch.manual_seed(0)
        config = hive.HiveConfig(
            vision_layers=[1, 3, 5, 7],
            llm_layers=[0, 1, 2, 3],
            connector=connector,
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        )
        model = hive.HiveForConditionalGeneration.from_vision_text(
            load_vision_encoder(vision_dir), AutoModelForCausalLM.from_pretrained(language_dir), config
        )
        served[connector] = directory / connector
        model.save_pretrained(served[connector])
        hive.HiveProcessor.for_model(model, tokenizer=tokenizer, image_processor=image_processor).save_pretrained(
            served[connector]
        )
    return served


class Served:
    """One `hive-serve` process on loopback."""

    def __init__(self, directory: Path, port: int, log: Path):
        import openai
        from transformers import AutoTokenizer

        self.directory = str(directory)
        self.eos = AutoTokenizer.from_pretrained(directory).eos_token_id  # held off: exactly NEW_TOKENS tokens
        self.log = open(log, "w")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "hive_adapter.tools.serve",
                self.directory,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            # one thread per server: two servers and the clients share the machine's cores
            env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"},
        )
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        deadline = time.monotonic() + 300
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"hive-serve {directory} exited: {Path(log).read_text()[-2000:]}")
            try:
                self.client.models.list()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"hive-serve {directory} did not start in 300 s") from None
                time.sleep(0.5)

    def request(self, image_url: str) -> float:
        """Send one streamed request; seconds to its first content chunk (the rest is read to the end)."""
        start = time.perf_counter()
        first = None
        stream = self.client.chat.completions.create(
            model=self.directory,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": image_url}},
                        {"type": "text", "text": QUESTION},
                    ],
                }
            ],  # fmt: skip
            stream=True,
            max_tokens=NEW_TOKENS,
            temperature=0,
            logit_bias={str(self.eos): -100},  # hive-serve refuses a client's generation_config (issue 36)
        )
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - start
        return first if first is not None else time.perf_counter() - start

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)
        self.log.close()


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def images(count: int) -> list[str]:
    """`count` synthetic 64x64 pictures as PNG data: URLs."""
    from hive_adapter.data.synthetic import SyntheticShapes

    shapes = SyntheticShapes(count, seed=11, image_size=64)
    urls = []
    for index in range(count):
        buffer = io.BytesIO()
        shapes.image(index).save(buffer, format="PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
    return urls


def measure(server: Served, clients: int, urls: list[str]) -> dict:
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        first_token = list(pool.map(server.request, urls))
    wall = time.perf_counter() - start
    return {
        "clients": clients,
        "requests": len(urls),
        "seconds": round(wall, 3),
        "requests_per_second": round(len(urls) / wall, 3),
        "time_to_first_token_median_ms": round(1000 * statistics.median(first_token), 1),
        "time_to_first_token_p90_ms": round(1000 * sorted(first_token)[int(0.9 * (len(first_token) - 1))], 1),
    }


def generate_alone(directory: Path, url: str, repeats: int = 10) -> float:
    """Median milliseconds of `model.generate` (16 new tokens, one thread) on one request's inputs, in process:
    the model's share of a request, without HTTP, the server and the image decoding."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.image_utils import load_image

    torch.set_num_threads(1)
    model = AutoModelForImageTextToText.from_pretrained(directory).eval()
    processor = AutoProcessor.from_pretrained(directory)
    messages = [{"role": "user", "content": [{"type": "image", "image": load_image(url)},
                                             {"type": "text", "text": QUESTION}]}]  # fmt: skip
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    times = []
    for _ in range(repeats + 2):
        start = time.perf_counter()
        model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        times.append(time.perf_counter() - start)
    return round(1000 * statistics.median(times[2:]), 1)


def run(requests: int, rounds: int, work: Path) -> dict:
    import platform

    import torch
    import transformers

    served = build_models(work)
    servers = {c: Served(served[c], free_port(), work / f"{c}.log") for c in CONNECTORS}
    results: dict[str, dict[int, list[dict]]] = {c: {n: [] for n in CLIENTS} for c in CONNECTORS}
    try:
        urls = images(requests)
        for server in servers.values():  # warm-up: first request loads lazily initialised parts
            server.request(urls[0])
        for _ in range(rounds):
            for clients in CLIENTS:
                for connector in CONNECTORS:
                    results[connector][clients].append(measure(servers[connector], clients, urls))
    finally:
        for server in servers.values():
            server.stop()
    in_process = {c: generate_alone(served[c], urls[0]) for c in CONNECTORS}
    table = []
    for clients in CLIENTS:
        row = {"clients": clients}
        for connector in CONNECTORS:
            runs = results[connector][clients]
            row[connector] = {
                "requests_per_second": round(statistics.median(r["requests_per_second"] for r in runs), 3),
                "time_to_first_token_median_ms": round(
                    statistics.median(r["time_to_first_token_median_ms"] for r in runs), 1
                ),
            }
        row["hive_over_concat_requests_per_second"] = round(
            row["hive"]["requests_per_second"] / row["concat"]["requests_per_second"], 2
        )
        row["concat_over_hive_time_to_first_token"] = round(
            row["concat"]["time_to_first_token_median_ms"] / row["hive"]["time_to_first_token_median_ms"], 2
        )
        table.append(row)
    return {
        "environment": {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        },
        "settings": {
            "requests_per_setting": requests,
            "rounds": rounds,
            "new_tokens": NEW_TOKENS,
            "image_size": 64,
            "models": "toy SigLIP 8x64 + toy Llama 4x96; hive 4 levels x 64 tokens, concat 64 patch tokens",
        },  # fmt: skip
        "generate_alone_ms": in_process,
        "table": table,
        "runs": {c: {str(n): r for n, r in per.items()} for c, per in results.items()},
    }


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        "# Serving throughput: HIVE vs concat through hive-serve (transformers serve)",
        "",
        f"Measured {env['date']} on {env['machine']} (torch {env['torch']}, transformers {env['transformers']}); "
        f"load average at the end {env['load_average_at_end']}. Command: `python -m benchmarks.serving`.",
        f"{result['settings']['requests_per_setting']} streamed requests per setting, "
        f"{result['settings']['rounds']} rounds alternating the models, medians over rounds; each request: one "
        f"64x64 PNG + a question, exactly {NEW_TOKENS} new tokens (greedy).",
        "",
        "| clients | hive req/s | concat req/s | hive / concat | hive TTFT ms | concat TTFT ms |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["table"]:
        lines.append(
            f"| {row['clients']} | {row['hive']['requests_per_second']} | {row['concat']['requests_per_second']} | "
            f"{row['hive_over_concat_requests_per_second']}x | {row['hive']['time_to_first_token_median_ms']} | "
            f"{row['concat']['time_to_first_token_median_ms']} |"
        )
    alone = result["generate_alone_ms"]
    lines += [
        "",
        f"`model.generate` alone, in process, one thread, same inputs: hive {alone['hive']} ms, concat "
        f"{alone['concat']} ms per request (hive takes {alone['hive'] / alone['concat']:.2f}x concat's time).",
        "",
        "Scope: " + __doc__.split("What the ratio means: ")[1].strip().replace("\n", " "),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = FullFlagParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=16, help="requests per setting (default 16)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds alternating the models (default 3)")
    parser.add_argument("--output", type=Path, default=OUTPUT, help=f"results directory (default {OUTPUT})")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.rounds < 1:
        parser.error(f"--requests {args.requests} / --rounds {args.rounds}: both must be at least 1")
    with tempfile.TemporaryDirectory() as work:
        result = run(args.requests, args.rounds, Path(work))
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "serving.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.output / "serving.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
