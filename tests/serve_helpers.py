"""`hive-serve` as a user starts it, a picture host to aim it at, and a /health latency probe (tests/test_serve.py).

Everything listens on 127.0.0.1 only; every client sends a bounded number of requests with a timeout.
"""

from __future__ import annotations

import base64
import http.server
import io
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai

START_TIMEOUT = 180  # seconds for the server to load and answer /health (2 busy cores)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def server_env(tmp) -> dict:
    """No HF cache directory at all (`/v1/models` must not need one), offline."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_CACHE": str(tmp / "none")}


class Server:
    """`hive-serve [OPTIONS] DIR` on loopback, its options before the directory; stopped (its log kept) at exit."""

    def __init__(self, directory, log_path, *options, api_key: str | None = None):
        self.directory, self.port, self.api_key = str(directory), free_port(), api_key
        self.log = open(log_path, "w")
        command = [sys.executable, "-m", "hive_adapter.tools.serve", "--host", "127.0.0.1", "--port", str(self.port),
                   *options, self.directory]  # fmt: skip
        self.process = subprocess.Popen(
            command, stdout=self.log, stderr=subprocess.STDOUT, env=server_env(log_path.parent)
        )
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
        self.client = self.openai_client()

    def openai_client(self, timeout: float = 120, api_key: str | None = None) -> openai.OpenAI:
        key = api_key or self.api_key or "unused"
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, timeout=timeout, max_retries=0)

    def output(self) -> str:
        self.log.flush()
        return open(self.log.name).read()

    def ask(self, messages, **options):
        settings = {"max_tokens": 6, "temperature": 0, **options}
        response = self.client.chat.completions.create(model=self.directory, messages=messages, **settings)
        return response if options.get("stream") else response.choices[0].message.content

    def post(self, path: str, body: bytes | dict, headers: dict | None = None, timeout: float = 60):
        """A raw POST (what no OpenAI client would send): `(status, parsed or raw body)`."""
        import json
        import urllib.error

        headers = {**({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}), **(headers or {})}
        if not isinstance(body, bytes):
            body, headers = json.dumps(body).encode(), {"Content-Type": "application/json", **headers}
        request = urllib.request.Request(f"{self.url}{path}", data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status, text = response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            status, text = error.code, error.read().decode()
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()

    def peak_memory_kib(self) -> int:
        """The server process's peak resident memory so far (VmHWM)."""
        for line in open(f"/proc/{self.process.pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise AssertionError("no VmHWM in /proc/PID/status")


def while_health_is_timed(server: Server, hostile, *, period: float = 0.1) -> tuple[object, float]:
    """Run `hostile()` in a thread while /health is asked every `period` s: (its result, slowest /health in s)."""
    slowest, done = 0.0, threading.Event()
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(hostile)
        future.add_done_callback(lambda _: done.set())
        time.sleep(0.05)  # let the hostile request reach the server
        for probe in range(600):
            if done.is_set() and probe >= 3:  # at least three probes, the first while it runs
                break
            started = time.monotonic()
            with urllib.request.urlopen(f"{server.url}/health", timeout=60) as response:
                assert response.status == 200
            slowest = max(slowest, time.monotonic() - started)
            time.sleep(period)
        try:
            return future.result(timeout=120), slowest
        except Exception as error:  # the hostile request's refusal is its result
            return error, slowest


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(image_or_png) -> str:
    png = image_or_png if isinstance(image_or_png, bytes) else png_bytes(image_or_png)
    return "data:image/png;base64," + base64.b64encode(png).decode()


class MediaHost:
    """A picture host on 127.0.0.1: `/picture.png`, `/slow.png` (one byte a second), `/big.png` (over any cap),
    `/away.png` (a redirect to the same port by the name `localhost`), `/here.png` (a redirect to /picture.png)."""

    def __init__(self, picture_png: bytes):
        self.requests: list[str] = []
        host = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                host.requests.append(self.path)
                if self.path in ("/away.png", "/here.png"):
                    target = "localhost" if self.path == "/away.png" else "127.0.0.1"
                    self.send_response(302)
                    self.send_header("Location", f"http://{target}:{host.port}/picture.png")
                    self.end_headers()
                    return
                body = {"/picture.png": picture_png, "/slow.png": picture_png, "/big.png": b"\0" * 2_000_000}.get(
                    self.path
                )
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.end_headers()
                if self.path != "/slow.png":
                    self.wfile.write(body)
                    return
                try:
                    for byte in body[:20]:  # stays under any read timeout, never finishes in time
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        time.sleep(1)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the server gave up on it, as it should

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
