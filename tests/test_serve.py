"""hive-serve: transformers' own `transformers serve` answering the real `openai` client about HIVE models.

The server runs as its own process on 127.0.0.1 (a free port), started and stopped here; each client sends a
bounded number of requests with a timeout. Answers must equal `model.generate` (greedy) on the same messages
through the same processor, also for 8 clients at once, each with its own picture (a "loud" checkpoint
answers different pictures differently, so a request that saw another's picture would be caught).
"""

import base64
import io
import os
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from hive_checkpoints import save_hive_checkpoint, solid_images, toy_models
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from hive_adapter.tools.serve import CONTINUOUS_BATCHING_REFUSAL

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
QUESTION = "what shape is it ?"
START_TIMEOUT = 180  # seconds for the server to load and answer /health (2 busy cores)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """`hive-serve DIR` as a user starts it, on loopback; stopped (and its log kept) at exit."""

    def __init__(self, directory, log_path):
        self.directory, self.port = str(directory), free_port()
        self.log = open(log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "hive_adapter.tools.serve", self.directory, "--host", "127.0.0.1", "--port",
             str(self.port)],
            stdout=self.log, stderr=subprocess.STDOUT, env=ENV,
        )  # fmt: skip
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert self.process.poll() is None, f"hive-serve exited: {self.output()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"hive-serve did not start in {START_TIMEOUT} s: {self.output()}"
            time.sleep(0.5)
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", timeout=120, max_retries=0)

    def output(self) -> str:
        self.log.flush()
        return open(self.log.name).read()

    def ask(self, messages, **options):
        response = self.client.chat.completions.create(
            model=self.directory, messages=messages, max_tokens=6, temperature=0, **options
        )
        return response if options.get("stream") else response.choices[0].message.content

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return toy_models(tmp_path_factory.mktemp("toy"))


@pytest.fixture(scope="module")
def marker_model(models, tmp_path_factory):
    """A saved HIVE model in marker mode with its processor, answering different pictures differently."""
    from transformers import AutoImageProcessor

    import hive_adapter as hive

    tokenizer = AutoTokenizer.from_pretrained(models[1])
    directory = tmp_path_factory.mktemp("served")
    save_hive_checkpoint(models, directory, image_token_id=tokenizer.convert_tokens_to_ids("<image>"), loud=True)
    config = hive.HiveConfig.from_pretrained(directory)
    hive.HiveProcessor.for_model(
        config, tokenizer=tokenizer, image_processor=AutoImageProcessor.from_pretrained(models[0])
    ).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def server(marker_model, tmp_path_factory):
    running = Server(marker_model, tmp_path_factory.mktemp("log") / "hive-serve.log")
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


@pytest.fixture(scope="module")
def reference(marker_model):
    """What `model.generate` answers (greedy, 6 new tokens) through the saved processor."""
    model = AutoModelForImageTextToText.from_pretrained(marker_model).eval()
    processor = AutoProcessor.from_pretrained(marker_model)

    def answer(messages):
        inputs = processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        new = model.generate(**inputs, max_new_tokens=6, do_sample=False)[0, inputs["input_ids"].shape[1] :]
        return processor.decode(new, skip_special_tokens=True)

    return answer


def test_the_openai_client_gets_what_generate_answers_streaming_and_not(server, reference, tmp_path):
    image_a, image_b = solid_images(2, seed=5)
    expected = reference(hf_message(image_a))
    assert server.ask(openai_message(data_url(image_a))) == expected
    chunks = server.ask(openai_message(data_url(image_a)), stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == expected
    # a local file, and two pictures in one message
    path = tmp_path / "picture.png"
    image_b.save(path)
    assert server.ask(openai_message(str(path))) == reference(hf_message(image_b))
    assert server.ask(openai_message(data_url(image_a), str(path), text="which ?")) == reference(
        hf_message(image_a, image_b, text="which ?")
    )
    # text only: no picture, no marker
    assert server.ask([{"role": "user", "content": QUESTION}]) == reference(
        [{"role": "user", "content": [{"type": "text", "text": QUESTION}]}]
    )


def test_eight_concurrent_clients_each_get_the_answer_for_their_own_picture(server, reference):
    images = solid_images(8, seed=0)
    expected = [reference(hf_message(image)) for image in images]
    assert len(set(expected)) > 1, expected  # else a request answered from another's picture would go unseen
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda image: server.ask(openai_message(data_url(image))), images))
    assert answers == expected


def test_bad_requests_get_a_named_http_400_and_the_server_keeps_serving(server, reference, tmp_path):
    image = solid_images(1, seed=9)[0]
    with pytest.raises(openai.BadRequestError, match=r"(?i)image") as broken:
        server.ask(openai_message("data:image/png;base64,bm90IGFuIGltYWdl"))  # "not an image"
    assert broken.value.status_code == 400
    with pytest.raises(openai.BadRequestError, match=r"missing\.png"):
        server.ask(openai_message(str(tmp_path / "missing.png")))
    # a marker typed into the text: two markers for one picture
    with pytest.raises(openai.BadRequestError, match=r"2 image markers '<image>'.*but 1 images were given"):
        server.ask(openai_message(data_url(image), text="<image> what is it ?"))
    assert server.ask(openai_message(data_url(image))) == reference(hf_message(image))
    assert "Traceback" not in server.output()


def test_a_captioning_model_refuses_a_second_picture_by_name(models, tmp_path):
    """hive-train's default models pair one picture with each prompt: a second one is a 400, not a crash."""
    from transformers import AutoImageProcessor

    import hive_adapter as hive

    directory = save_hive_checkpoint(models, tmp_path / "captioning")
    hive.HiveProcessor.for_model(
        hive.HiveConfig.from_pretrained(directory),
        tokenizer=AutoTokenizer.from_pretrained(models[1]),
        image_processor=AutoImageProcessor.from_pretrained(models[0]),
    ).save_pretrained(directory)
    captioning = Server(directory, tmp_path / "log")
    try:
        first, second = solid_images(2)
        with pytest.raises(openai.BadRequestError, match=r"exactly one image with each sample .* got 2 images"):
            captioning.ask(openai_message(data_url(first), data_url(second)))
        assert isinstance(captioning.ask(openai_message(data_url(first))), str)
    finally:
        captioning.stop()


def hive_serve(*args):
    return subprocess.run(
        [sys.executable, "-m", "hive_adapter.tools.serve", *map(str, args)],
        capture_output=True, text=True, env=ENV, timeout=120,
    )  # fmt: skip


def test_hive_serve_refuses_what_it_cannot_serve_by_name(marker_model, models, tmp_path):
    refused = hive_serve(marker_model, "--continuous-batching")
    assert refused.returncode != 0 and CONTINUOUS_BATCHING_REFUSAL in refused.stderr
    missing = hive_serve(tmp_path / "nowhere")
    assert missing.returncode != 0 and "does not exist; give the directory of a HIVE model" in missing.stderr
    a_file = tmp_path / "model.safetensors"
    a_file.write_text("")
    assert "is a file; give the directory" in hive_serve(a_file).stderr
    assert "holds a 'llama' model, not a HIVE one" in hive_serve(models[1]).stderr
    assert "usage: hive-serve DIR" in hive_serve().stderr
    assert "--continuous-batching" in hive_serve("--help").stdout  # transformers serve's own options
