"""hive-serve: transformers' own `transformers serve` answering the real `openai` client about HIVE models.

Two servers run as their own processes on 127.0.0.1 (free ports), each started once for the module: `server`
(marker mode) with every hive-serve option set (its options before the directory, as `--help` shows them), and
`default_server` (captioning mode) with none, to show what the defaults allow. Each client sends a bounded number
of requests with a timeout. Answers must equal `model.generate` (greedy) on the same messages through the same
processor, also for 8 clients at once, each with its own picture (a "loud" checkpoint answers different pictures
differently, so a request that saw another's picture would be caught). The hostile requests are issue 36's.
"""

import base64
import http.client
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from hive_checkpoints import save_hive_checkpoint, solid_images, toy_models
from serve_helpers import MediaHost, Server, data_url, free_port, png_bytes, server_env, while_health_is_timed
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from hive_adapter.tools.serve import CONTINUOUS_BATCHING_REFUSAL

QUESTION = "what shape is it ?"
KEY = "test-key-36"
POSITIONS = 2048  # the served marker model's (its LM's max_position_embeddings)
ONE_LOCAL_REFUSAL = "not a readable picture file under the server's --allowed-local-media-path"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return toy_models(tmp_path_factory.mktemp("toy"))


def with_processor(directory, models):
    from transformers import AutoImageProcessor

    import hive_adapter as hive

    hive.HiveProcessor.for_model(
        hive.HiveConfig.from_pretrained(directory),
        tokenizer=AutoTokenizer.from_pretrained(models[1]),
        image_processor=AutoImageProcessor.from_pretrained(models[0]),
    ).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def marker_model(models, tmp_path_factory):
    """A saved HIVE model in marker mode with its processor, answering different pictures differently; its LM
    has 2048 positions (room for a generation long enough to see it stopped)."""
    tokenizer = AutoTokenizer.from_pretrained(models[1])
    directory = tmp_path_factory.mktemp("served")
    save_hive_checkpoint(models, directory, image_token_id=tokenizer.convert_tokens_to_ids("<image>"), loud=True)
    config = json.loads((directory / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = POSITIONS
    (directory / "config.json").write_text(json.dumps(config))
    return with_processor(directory, models)


@pytest.fixture(scope="module")
def pictures():
    return solid_images(4, seed=5)


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory, pictures):
    """The directory `server` may read pictures from; next to it, a picture it must not read, and a link to it."""
    root = tmp_path_factory.mktemp("media")
    allowed, outside = root / "allowed", root / "outside"
    allowed.mkdir()
    outside.mkdir()
    pictures[1].save(allowed / "inside.png")
    pictures[2].save(outside / "secret.png")
    (allowed / "link.png").symlink_to(outside / "secret.png")
    return allowed


@pytest.fixture(scope="module")
def media_host(pictures):
    host = MediaHost(png_bytes(pictures[3]))
    yield host
    host.stop()


@pytest.fixture(scope="module")
def server(marker_model, media_dir, tmp_path_factory):
    options = ["--allowed-local-media-path", str(media_dir), "--allowed-media-domains", "127.0.0.1",
               "--limit-mm-per-prompt", '{"image": 3}', "--max-image-pixels", "1000000", "--max-media-bytes",
               "300000", "--media-fetch-timeout", "2", "--max-request-bytes", "2000000", "--api-key", KEY]  # fmt: skip
    running = Server(marker_model, tmp_path_factory.mktemp("log") / "hive-serve.log", *options, api_key=KEY)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def default_server(models, tmp_path_factory):
    """hive-train's default (captioning) model served with no hive-serve option: the defaults."""
    directory = with_processor(save_hive_checkpoint(models, tmp_path_factory.mktemp("captioning")), models)
    running = Server(directory, tmp_path_factory.mktemp("log") / "hive-serve.log")
    yield running
    running.stop()


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

    def answer(messages, tokens=6):
        inputs = processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        new = model.generate(**inputs, max_new_tokens=tokens, do_sample=False)[0, inputs["input_ids"].shape[1] :]
        return processor.decode(new, skip_special_tokens=True)

    return answer


def test_the_openai_client_gets_what_generate_answers_streaming_and_not(server, reference, media_dir, media_host):
    image_a, image_b, _, image_c = solid_images(4, seed=5)
    expected = reference(hf_message(image_a))
    assert server.ask(openai_message(data_url(image_a))) == expected
    chunks = server.ask(openai_message(data_url(image_a)), stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == expected
    # a file under --allowed-local-media-path (absolute, or relative to it), two pictures in one message
    assert server.ask(openai_message(str(media_dir / "inside.png"))) == reference(hf_message(image_b))
    assert server.ask(openai_message(data_url(image_a), "inside.png", text="which ?")) == reference(
        hf_message(image_a, image_b, text="which ?")
    )
    # a URL on --allowed-media-domains, also through a redirect that stays on it
    assert server.ask(openai_message(media_host.url("/picture.png"))) == reference(hf_message(image_c))
    assert server.ask(openai_message(media_host.url("/here.png"))) == reference(hf_message(image_c))
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


def test_bad_requests_get_a_named_http_400_and_the_server_keeps_serving(server, reference):
    image = solid_images(1, seed=9)[0]
    with pytest.raises(openai.BadRequestError, match=r"not a picture in one of PNG") as broken:
        server.ask(openai_message("data:image/png;base64,bm90IGFuIGltYWdl"))  # "not an image"
    assert broken.value.status_code == 400
    # a marker typed into the text: two markers for one picture
    with pytest.raises(openai.BadRequestError, match=r"2 image markers '<image>'.*but 1 images were given"):
        server.ask(openai_message(data_url(image), text="<image> what is it ?"))
    assert server.ask(openai_message(data_url(image))) == reference(hf_message(image))
    assert "Traceback" not in server.output()


def test_a_captioning_model_refuses_a_second_picture_by_name(default_server):
    """hive-train's default models pair one picture with each prompt: a second one is a 400, not a crash."""
    first, second = solid_images(2)
    with pytest.raises(openai.BadRequestError, match=r"exactly one image with each sample .* got 2 images"):
        default_server.ask(openai_message(data_url(first), data_url(second)))
    assert isinstance(default_server.ask(openai_message(data_url(first))), str)


def hive_serve(*args, tmp):
    return subprocess.run(
        [sys.executable, "-m", "hive_adapter.tools.serve", *map(str, args)],
        capture_output=True, text=True, env=server_env(tmp), timeout=120,
    )  # fmt: skip


def test_hive_serve_refuses_what_it_cannot_serve_by_name(marker_model, models, tmp_path):
    refused = hive_serve(marker_model, "--continuous-batching", tmp=tmp_path)
    assert refused.returncode != 0 and CONTINUOUS_BATCHING_REFUSAL in refused.stderr
    missing = hive_serve(tmp_path / "nowhere", tmp=tmp_path)
    assert missing.returncode != 0 and "does not exist; give the directory of a HIVE model" in missing.stderr
    a_file = tmp_path / "model.safetensors"
    a_file.write_text("")
    assert "is a file; give the directory" in hive_serve(a_file, tmp=tmp_path).stderr
    assert "holds a 'llama' model, not a HIVE one" in hive_serve(models[1], tmp=tmp_path).stderr
    assert "usage: hive-serve DIR" in hive_serve(tmp=tmp_path).stderr
    helped = hive_serve("--help", tmp=tmp_path).stdout
    assert "--continuous-batching" in helped and "--allowed-local-media-path" in helped  # both sets of options
    # 14: options before the directory, in the order --help shows; the directory is the one named
    before = hive_serve("--host", "127.0.0.1", "--port", "1", tmp_path / "nowhere", tmp=tmp_path).stderr
    assert f"{str(tmp_path / 'nowhere')!r} does not exist" in before
    assert "is not a directory" in hive_serve("--allowed-local-media-path", a_file, marker_model, tmp=tmp_path).stderr
    assert "is not '{\"image\": N}'" in hive_serve("--limit-mm-per-prompt", "3", marker_model, tmp=tmp_path).stderr


# ---------------------------------------------------------------------- issue 36: a client cannot aim the server
def test_1_local_files_only_under_the_allowed_directory_with_one_message_for_every_refusal(
    server, default_server, media_dir
):
    inside = str(media_dir / "inside.png")
    with pytest.raises(openai.BadRequestError, match="this server reads no local files; send the picture as a data"):
        default_server.ask(openai_message(inside))  # the defaults read no file at all
    aimed = [str(media_dir.parent / "outside" / "secret.png"), str(media_dir / ".." / "outside" / "secret.png"),
             "../outside/secret.png", "link.png", str(media_dir / "missing.png"), "/etc/shadow", "/etc/passwd",
             str(media_dir), "file:///etc/passwd", "/proc/self/environ"]  # fmt: skip
    messages = set()
    for path in aimed:
        with pytest.raises(openai.BadRequestError) as refused:
            server.ask(openai_message(path))
        messages.add(refused.value.body["message"])
    assert messages == {f"messages[0].content[0].image_url: {ONE_LOCAL_REFUSAL}; send it as a data: URL, or give a "
                        "path of a file inside that directory"}  # fmt: skip


def test_2_urls_only_from_allowed_hosts_without_redirects_away_within_time_and_bytes(
    server, default_server, media_host
):
    asked = len(media_host.requests)
    with pytest.raises(openai.BadRequestError, match="this server fetches no URLs"):
        default_server.ask(openai_message(media_host.url("/picture.png")))
    assert len(media_host.requests) == asked  # not even asked
    for url, refusal in [
        (media_host.url("/picture.png", host="localhost"), "not one of the server's --allowed-media-domains"),
        (media_host.url("/away.png"), "not one of the server's --allowed-media-domains"),  # redirect to localhost
        (media_host.url("/big.png"), "over 300000 bytes"),
        (f"http://127.0.0.1:{free_port()}/closed.png", r"could not be fetched \(ConnectionRefusedError\)"),
    ]:
        with pytest.raises(openai.BadRequestError, match=refusal):
            server.ask(openai_message(url))
    assert media_host.requests[asked:] == ["/away.png", "/big.png"]  # the redirect to another host was not followed
    started = time.monotonic()
    refused, slowest_health = while_health_is_timed(
        server, lambda: server.ask(openai_message(media_host.url("/slow.png")))
    )
    assert isinstance(refused, openai.BadRequestError) and "within 2 s" in str(refused), refused
    print(f"slow URL: refused after {time.monotonic() - started:.2f} s, slowest /health {slowest_health:.3f} s")
    assert time.monotonic() - started < 6 and slowest_health < 1.0, (time.monotonic() - started, slowest_health)


def test_3_admin_endpoints_and_unguarded_ones_are_refused(default_server):
    assert default_server.post("/reset", b"")[0] == 403
    assert default_server.post("/load_model", {"model": default_server.directory})[0] == 403
    for path in ("/v1/responses", "/v1/completions"):
        assert default_server.post(path, {"model": default_server.directory, "input": "hi"})[0] == 404
    assert isinstance(default_server.ask([{"role": "user", "content": QUESTION}]), str)  # the model stayed


def test_4_a_clients_chat_template_kwargs_or_generation_config_are_refused(default_server):
    for name, value in [("chat_template_kwargs", {"chat_template": "{{ 'hello' }}"}),
                        ("generation_config", json.dumps({"max_new_tokens": 10**6}))]:  # fmt: skip
        with pytest.raises(openai.BadRequestError, match=f"{name} is not accepted") as refused:
            default_server.ask([{"role": "user", "content": QUESTION}], extra_body={name: value})
        assert refused.value.body["param"] == name


def test_5_the_api_key_is_required_on_v1_as_a_bearer_token(server):
    with pytest.raises(openai.AuthenticationError, match="a valid API key is needed"):
        server.openai_client(api_key="wrong").chat.completions.create(
            model=server.directory, messages=[{"role": "user", "content": QUESTION}], max_tokens=2
        )
    assert server.post("/v1/chat/completions", {"messages": []}, headers={"Authorization": ""})[0] == 401
    assert [model.id for model in server.client.models.list()] == [server.directory]  # 11: no HF cache needed


# ---------------------------------------------------------------------- issue 36: bounded work per request
def test_6_a_huge_canvas_is_refused_from_its_header_while_health_keeps_answering(default_server, server, tmp_path):
    from PIL import Image

    canvas = png_bytes(Image.new("1", (13000, 13000)))  # 169 Mpixel, a few KB of PNG
    before = default_server.peak_memory_kib()
    refused, slowest_health = while_health_is_timed(
        default_server, lambda: default_server.ask(openai_message(data_url(canvas)))
    )
    assert isinstance(refused, openai.BadRequestError) and "13000x13000 = 169000000 pixels" in str(refused), refused
    grown_mib = (default_server.peak_memory_kib() - before) / 1024
    print(f"13000x13000 canvas: slowest /health {slowest_health:.3f} s, server peak memory +{grown_mib:.1f} MiB")
    assert slowest_health < 1.0 and grown_mib < 100, (slowest_health, grown_mib)
    picture = data_url(solid_images(1)[0])
    with pytest.raises(openai.BadRequestError, match="holds 5 pictures; this server takes at most 4"):
        default_server.ask(openai_message(*[picture] * 5))
    with pytest.raises(openai.BadRequestError, match="holds 4 pictures; this server takes at most 3"):
        server.ask(openai_message(*[picture] * 4))
    with pytest.raises(openai.BadRequestError, match="1001x1000 = 1001000 pixels, over the server's --max-image"):
        server.ask(openai_message(data_url(Image.new("RGB", (1001, 1000)))))
    # a body declared over --max-request-bytes is refused from its header, before the server reads it
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.putrequest("POST", "/v1/chat/completions")
    for name, value in [("Authorization", f"Bearer {KEY}"), ("Content-Type", "application/json"),
                        ("Content-Length", "2500000")]:  # fmt: skip
        connection.putheader(name, value)
    connection.endheaders(b"{")
    answer = connection.getresponse()
    assert answer.status == 413 and "--max-request-bytes" in json.loads(answer.read())["error"]["message"]
    connection.close()


def test_7_a_junk_payload_is_never_echoed(default_server):
    junk = "data:image/png;base64," + base64.b64encode(os.urandom(9_000_000)).decode()  # 12 MB
    log_before = len(default_server.output())
    with pytest.raises(openai.BadRequestError, match="not a picture") as refused:
        default_server.ask(openai_message(junk))
    assert len(str(refused.value)) < 1000 and len(default_server.output()) - log_before < 5000


def test_8_prompt_plus_max_tokens_within_the_positions_and_an_abandoned_request_is_stopped(server, models):
    with pytest.raises(openai.BadRequestError, match=rf"\+ max_tokens \(1000000000\) is over the model's {POSITIONS}"):
        server.ask([{"role": "user", "content": QUESTION}], max_tokens=10**9)
    with pytest.raises(openai.BadRequestError, match=rf"the prompt is \d+ tokens; the model has {POSITIONS} positions"):
        server.ask([{"role": "user", "content": "what " * 2500}], max_tokens=None)
    eos = AutoTokenizer.from_pretrained(models[1]).eos_token_id
    hung_up = server.openai_client(timeout=2)
    with pytest.raises(openai.APITimeoutError):  # a long answer (no end token allowed) the client gives up on
        hung_up.chat.completions.create(model=server.directory, messages=[{"role": "user", "content": QUESTION}],
                                        max_tokens=POSITIONS - 64, temperature=0, logit_bias={str(eos): -100})  # fmt: skip
    started = time.monotonic()
    server.ask([{"role": "user", "content": QUESTION}], max_tokens=4)
    print(f"the request after a hung-up {POSITIONS - 64}-token one answered in {time.monotonic() - started:.2f} s")
    assert time.monotonic() - started < 5, f"the next request waited {time.monotonic() - started:.1f} s"


# ---------------------------------------------------------------------- issue 36: wrong answers and 500s
def test_9_temperature_samples_and_a_seed_repeats_it(server):
    question = [{"role": "user", "content": QUESTION}]
    sampled = {server.ask(question, temperature=1.5, seed=seed) for seed in range(5)}
    assert len(sampled) > 1, sampled
    assert server.ask(question, temperature=1.5, seed=3) == server.ask(question, temperature=1.5, seed=3)
    assert isinstance(server.ask(question, temperature=1.0, top_p=0.5, seed=1), str)


def test_10_stop_ends_the_answer_before_the_stop_string(server):
    question = [{"role": "user", "content": QUESTION}]
    full = server.ask(question, max_tokens=8, temperature=1.5, seed=4)  # sampled: more than one word
    stop = full.split()[len(full.split()) // 2]
    expected = full[: full.find(stop)]
    assert server.ask(question, max_tokens=8, temperature=1.5, seed=4, stop=[stop]) == expected
    chunks = server.ask(question, max_tokens=8, temperature=1.5, seed=4, stop=stop, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == expected


def test_10_a_stop_string_split_across_streamed_pieces_is_still_cut():
    from hive_adapter.tools.serve_handlers import StopTrimmer

    trimmer = StopTrimmer(("top left", "zz"))
    given = [trimmer.feed(piece) for piece in ("circle t", "op", " le", "ft more", " words")]
    assert given == ["circle ", "", "", "", ""] and trimmer.flush() == ""
    unstopped = StopTrimmer(("top left",))
    assert unstopped.feed("a to") + unstopped.feed("p") + unstopped.flush() == "a top"


def test_11_n_above_1_is_a_400(server):
    with pytest.raises(openai.BadRequestError, match="n must be 1") as refused:
        server.ask([{"role": "user", "content": QUESTION}], n=3)
    assert refused.value.body["param"] == "n"


def test_12_malformed_bodies_are_a_400_naming_the_field(default_server):
    text = {"type": "text", "text": QUESTION}
    for messages, field in [
        ([], "messages"),
        (None, "messages"),
        ([{"role": "user", "content": [{"text": QUESTION}]}], "messages[0].content[0].type"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}, text]}], "messages[0].content[0].image_url.url"),
        ([{"role": "user", "content": text}], "messages[0].content"),
        ([{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "/etc/passwd"}}]}], "messages[0].content[0].type"),
        (["hello"], "messages[0]"),
    ]:  # fmt: skip
        body = {"model": default_server.directory, **({"messages": messages} if messages is not None else {})}
        status, answer = default_server.post("/v1/chat/completions", body)
        assert status == 400 and answer["error"]["param"] == field, (messages, status, answer)
    for raw in (b"not json", b"[1, 2]"):
        status, answer = default_server.post("/v1/chat/completions", raw, {"Content-Type": "application/json"})
        assert status == 400 and "must be a JSON object" in answer["error"]["message"], (raw, status, answer)
    assert "Traceback" not in default_server.output()


def test_13_an_error_inside_a_streamed_generation_reaches_the_openai_client(server):
    with pytest.raises(openai.BadRequestError, match="vocabulary size is .* tokens were being biased"):
        for _ in server.ask([{"role": "user", "content": QUESTION}], stream=True, logit_bias={"99999": 5}):
            pass
