"""`hive-serve DIR`: transformers' own `transformers serve` with HIVE registered; no server of our own.

    hive-serve run/stage3 --port 8000            # then any OpenAI client: base_url="http://localhost:8000/v1"
    python -m hive_adapter.tools.serve run/stage3 ...  # the same

Every option of `transformers serve` is accepted (`hive-serve --help` lists them), before or after DIR. The server
is OpenAI-compatible: `/v1/chat/completions` (streaming and not), `/v1/models`, `/health`. The model is the HIVE
directory given, pinned: requests name it as their `model`.

What `hive_serving()` changes in transformers' serve, for the life of the server (`serve_handlers`, `serve_app`):
- its model manager loads `model_type="hive"` through `AutoModelForImageTextToText` (transformers' looks the
  class up in its own namespace), calls HIVE a VLM, and lists the served model in `/v1/models`;
- its chat handler checks each body first (`serve_requests`: a malformed one is a 400 naming the field), reads
  pictures only as the media policy allows (`serve_media`: `data:` URLs by default, files under
  `--allowed-local-media-path`, URLs on `--allowed-media-domains`; pixels checked from the header), bounds the
  work (`--limit-mm-per-prompt`, `--max-request-bytes`, prompt + `max_tokens` within the model's positions),
  honours `temperature`/`top_p`/`seed`/`stop`, and stops a generation whose client hung up;
- its app refuses `/load_model`, `/reset` and the endpoints not guarded here, takes `--api-key`, and answers
  every error in OpenAI's shape with a short message that never quotes the request.
Generation runs on transformers' single inference thread per model, one request after another, so HIVE's
per-prompt vision context is never shared between requests.

Continuous batching (`--continuous-batching`) is refused: transformers' paged scheduler interleaves the tokens
of many requests in one flattened batch and calls the model without the images, and HIVE's cross-attention
needs to know, per token, which request's images it may see (docs/ARCHITECTURE.md, "Serving").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..utils.console import say as console_say
from ..utils.flags import FullFlagParser
from .serve_media import DEFAULT_FETCH_TIMEOUT, DEFAULT_MAX_MEDIA_BYTES, DEFAULT_MAX_PIXELS, MediaPolicy
from .serve_requests import DEFAULT_IMAGES_PER_REQUEST, DEFAULT_MAX_REQUEST_BYTES, RequestLimits

logger = logging.getLogger(__name__)

COMMAND = "hive-serve"
API_KEY_ENV = "HIVE_SERVE_API_KEY"
CONTINUOUS_BATCHING_REFUSAL = (
    "--continuous-batching is not supported for HIVE models: transformers' paged scheduler packs the tokens of "
    "many requests into one batch and calls the model without their images, while HIVE's cross-attention must "
    "know which request's images each token may see. Serve without it (requests are generated one after "
    "another); docs/ARCHITECTURE.md, 'Serving', says what continuous batching needs."
)


def say(message: str) -> None:
    console_say(COMMAND, message)


def check_model_directory(path: str) -> Path:
    """`path` must be a directory holding a HIVE checkpoint (config.json with model_type "hive")."""
    directory = Path(path)
    if not directory.exists():
        raise SystemExit(f"{COMMAND}: {path!r} does not exist; give the directory of a HIVE model (e.g. run/stage3)")
    if not directory.is_dir():
        raise SystemExit(f"{COMMAND}: {path!r} is a file; give the directory of a HIVE model (e.g. run/stage3)")
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise SystemExit(f"{COMMAND}: {path!r} has no config.json; give the directory of a HIVE model (hive-train "
                         "writes one per stage: run/stage1, run/stage2, run/stage3)")  # fmt: skip
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except json.JSONDecodeError as error:
        raise SystemExit(f"{COMMAND}: {config_file} is not valid JSON ({error})") from None
    if model_type != "hive":
        raise SystemExit(
            f"{COMMAND}: {path!r} holds a {model_type!r} model, not a HIVE one; serve it with `transformers serve` "
            "(hive-serve adds HIVE to it, nothing else)"
        )
    return directory


@dataclass(frozen=True)
class ServeSettings:
    """What hive-serve adds to `transformers serve`'s options (docs/guides/use-and-serve.md, "Serve it")."""

    media: MediaPolicy = MediaPolicy()
    limits: RequestLimits = RequestLimits()
    api_key: str | None = None


@contextlib.contextmanager
def hive_serving(settings: ServeSettings | None = None) -> Iterator[None]:
    """transformers' serve, able to load and run HIVE models and guarded by `settings`, for the block."""
    from transformers.cli.serving import chat_completion, model_manager, server, utils

    import hive_adapter  # noqa: F401  (registers model_type "hive" with AutoConfig, the model and processor autos)

    from .serve_handlers import hive_chat_handler, hive_generate_manager, hive_model_manager

    settings = settings or ServeSettings()
    patched = [
        (model_manager, "ModelManager", hive_model_manager(model_manager.ModelManager)),
        (chat_completion, "ChatCompletionHandler",
         hive_chat_handler(chat_completion.ChatCompletionHandler, settings.media, settings.limits)),
        (utils, "GenerateManager", hive_generate_manager(utils.GenerateManager)),
        (server, "build_server", _guarded(server.build_server, settings)),
    ]  # fmt: skip
    originals = [(module, name, getattr(module, name)) for module, name, _ in patched]
    for module, name, replacement in patched:
        setattr(module, name, replacement)
    try:
        yield
    finally:
        for module, name, original in originals:
            setattr(module, name, original)


def _guarded(build_server, settings: ServeSettings):
    def build(*args, **kwargs):
        from .serve_app import guard_app

        app = build_server(*args, **kwargs)
        return guard_app(app, api_key=settings.api_key, max_request_bytes=settings.limits.max_request_bytes)

    return build


def hive_options() -> argparse.ArgumentParser:
    """hive-serve's own options (vLLM's names where vLLM has one); the rest are transformers serve's."""
    parser = FullFlagParser(prog=COMMAND, add_help=False)
    parser.add_argument(
        "--allowed-local-media-path",
        default=None,
        metavar="DIR",
        help="read image_url local paths under DIR only (default: no local file is read)",
    )
    parser.add_argument(
        "--allowed-media-domains",
        action="append",
        default=[],
        metavar="HOST[,HOST...]",
        help="fetch http(s) image URLs from these hosts only (default: no URL is fetched)",
    )
    parser.add_argument(
        "--limit-mm-per-prompt",
        default=None,
        metavar="'{\"image\": N}'",
        help=f"pictures per request (default {DEFAULT_IMAGES_PER_REQUEST})",
    )
    parser.add_argument(
        "--max-image-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help=f"width x height of a picture, read from its header (default {DEFAULT_MAX_PIXELS})",
    )
    parser.add_argument(
        "--max-media-bytes",
        type=int,
        default=DEFAULT_MAX_MEDIA_BYTES,
        help=f"bytes of one picture (default {DEFAULT_MAX_MEDIA_BYTES})",
    )
    parser.add_argument(
        "--media-fetch-timeout",
        type=float,
        default=DEFAULT_FETCH_TIMEOUT,
        help=f"seconds for a whole URL fetch (default {DEFAULT_FETCH_TIMEOUT:g})",
    )
    parser.add_argument(
        "--max-request-bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        help=f"bytes of a request body (default {DEFAULT_MAX_REQUEST_BYTES})",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"require 'Authorization: Bearer KEY' on /v1/... (or set ${API_KEY_ENV})",
    )
    return parser  # fmt: skip


def settings_from(options: argparse.Namespace) -> ServeSettings:
    media_root = None
    if options.allowed_local_media_path is not None:
        media_root = Path(options.allowed_local_media_path).resolve()
        if not media_root.is_dir():
            raise SystemExit(f"{COMMAND}: --allowed-local-media-path {options.allowed_local_media_path!r} is not a "
                             "directory; give the directory whose pictures requests may name")  # fmt: skip
    domains = tuple(
        host.strip().lower() for value in options.allowed_media_domains for host in value.split(",") if host.strip()
    )
    images = DEFAULT_IMAGES_PER_REQUEST
    if options.limit_mm_per_prompt is not None:
        try:
            limit = json.loads(options.limit_mm_per_prompt)
            images = limit["image"]
            if not isinstance(images, int) or images < 0 or set(limit) != {"image"}:
                raise ValueError
        except (ValueError, TypeError, KeyError):
            raise SystemExit(f"{COMMAND}: --limit-mm-per-prompt {options.limit_mm_per_prompt!r} is not "
                             '\'{"image": N}\' (JSON, N >= 0; a HIVE model reads pictures only)') from None  # fmt: skip
    for name in ("max_image_pixels", "max_media_bytes", "max_request_bytes", "media_fetch_timeout"):
        if getattr(options, name) <= 0:
            raise SystemExit(f"{COMMAND}: --{name.replace('_', '-')} must be positive")
    if options.api_key is not None and not options.api_key.strip():
        raise SystemExit(f"{COMMAND}: --api-key is empty; give a secret or leave the option out")
    media = MediaPolicy(media_root, domains, options.max_image_pixels, options.max_media_bytes,
                        options.media_fetch_timeout)  # fmt: skip
    limits = RequestLimits(images_per_request=images, max_request_bytes=options.max_request_bytes)
    return ServeSettings(media=media, limits=limits, api_key=options.api_key)


def main(argv: list[str] | None = None) -> None:
    """`hive-serve DIR [options]`: hive-serve's options and transformers serve's, before or after DIR."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(flag in ("-h", "--help") for flag in args):
        print(hive_options().format_help().replace("usage:", "hive-serve's own options; usage:", 1))
        return _run_serve(args, ServeSettings())
    options, rest = hive_options().parse_known_args(args)
    settings = settings_from(options)
    if any(arg == "--continuous-batching" for arg in rest):
        raise SystemExit(f"{COMMAND}: {CONTINUOUS_BATCHING_REFUSAL}")
    positional = _positional(rest)
    if not positional:
        raise SystemExit(f"usage: {COMMAND} DIR [options]; DIR is a HIVE model directory (`{COMMAND} --help`)")
    directory = check_model_directory(rest[positional[0]])
    host = _option(rest, "--host", "localhost")
    port = _option(rest, "--port", "8000")
    say(
        f"serving {directory} at http://{host}:{port}/v1 (OpenAI-compatible; transformers serve); " + _summary(settings)
    )
    _run_serve(rest, settings)


def _summary(settings: ServeSettings) -> str:
    media = settings.media
    sources = ["data: URLs"]
    if media.allowed_local_media_path is not None:
        sources.append(f"files under {media.allowed_local_media_path}")
    if media.allowed_media_domains:
        sources.append(f"URLs on {', '.join(media.allowed_media_domains)}")
    key = "an API key" if settings.api_key else "no API key"
    return f"pictures from {', '.join(sources)}; {key}"


def _positional(args: list[str]) -> list[int]:
    """Indexes of the arguments that are no option nor an option's value, by transformers serve's own options."""
    value_options = _value_options()
    positional, index = [], 0
    while index < len(args):
        arg = args[index]
        if arg.startswith("-"):
            index += 2 if arg in value_options else 1
            continue
        positional.append(index)
        index += 1
    return positional


def _value_options() -> set[str]:
    import typer
    from transformers.cli.serve import Serve

    app = typer.Typer(add_completion=False)
    app.command()(Serve)
    command = typer.main.get_command(app)
    return {name for param in command.params if not getattr(param, "is_flag", True) for name in param.opts}


def _option(args: list[str], name: str, default: str) -> str:
    for index, arg in enumerate(args):
        if arg == name and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return default


def _run_serve(args: list[str], settings: ServeSettings) -> None:
    import typer
    from transformers.cli.serve import Serve

    app = typer.Typer(add_completion=False)
    app.command(help=__doc__)(Serve)  # the one command: its options are transformers serve's own
    with hive_serving(settings):
        app(args=args, prog_name=COMMAND)


if __name__ == "__main__":
    main()
