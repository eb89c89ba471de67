"""`hive-serve DIR`: transformers' own `transformers serve` with HIVE registered; no server of our own.

    hive-serve run/stage3 --port 8000            # then any OpenAI client: base_url="http://localhost:8000/v1"
    python -m hive_adapter.tools.serve run/stage3 ...  # the same

Every option of `transformers serve` is accepted (`hive-serve --help` lists them). The server is
OpenAI-compatible: `/v1/chat/completions` (streaming and not) with image content parts as `data:` URLs,
local paths or URLs, `/v1/models`, `/health`. The model is the HIVE directory given, pinned: requests name it
as their `model` (or leave the field out, as the OpenAI client does not allow; pass the same string).

transformers' serve needs three things a model defined outside transformers does not give it by itself;
`hive_serving()` supplies them for the life of the server, and nothing else is changed:
- its model manager loads a checkpoint through `getattr(transformers, config.architectures[0])`, which has no
  `HiveForConditionalGeneration`: ours loads `model_type="hive"` through `AutoModelForImageTextToText`;
- it tells a VLM from an LLM by transformers' own class-name tables: ours answers "VLM" for HIVE, so image
  content parts reach `HiveProcessor.apply_chat_template`;
- a request the processor refuses (a broken image, more images than the model takes) would be an HTTP 500 with
  no detail: it is answered as a 400 `invalid_request_error` whose message names the problem, and the server
  goes on serving.
Generation runs on transformers' single inference thread per model, one request after another, so HIVE's
per-prompt vision context is never shared between requests.

Continuous batching (`--continuous-batching`) is refused: transformers' paged scheduler interleaves the tokens
of many requests in one flattened batch and calls the model without the images, and HIVE's cross-attention
needs to know, per token, which request's images it may see (docs/ARCHITECTURE.md, "Serving").
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

from ..utils.console import say as console_say

logger = logging.getLogger(__name__)

COMMAND = "hive-serve"
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


@contextlib.contextmanager
def hive_serving() -> Iterator[None]:
    """transformers' serve, able to load and run HIVE models, for the duration of the block."""
    from transformers.cli.serving import model_manager, server

    import hive_adapter  # noqa: F401  (registers model_type "hive" with AutoConfig, the model and processor autos)

    original_manager, original_build = model_manager.ModelManager, server.build_server
    model_manager.ModelManager = _hive_model_manager(original_manager)
    server.build_server = _with_request_errors(original_build)
    try:
        yield
    finally:
        model_manager.ModelManager, server.build_server = original_manager, original_build


def _hive_model_manager(base: type) -> type:
    from transformers.cli.serving.utils import Modality

    class HiveModelManager(base):
        """transformers' model manager, which also loads HIVE checkpoints and calls them VLMs."""

        def _load_model(self, model_id_and_revision, tqdm_class=None, progress_callback=None, gguf_file=None):
            model_id = model_id_and_revision.split("@", 1)[0]
            config_file = Path(model_id, "config.json")
            if gguf_file is None and config_file.is_file():
                if json.loads(config_file.read_text()).get("model_type") == "hive":
                    from transformers import AutoModelForImageTextToText

                    dtype = self.dtype if self.dtype is not None else "auto"
                    model = AutoModelForImageTextToText.from_pretrained(
                        model_id, dtype=dtype, attn_implementation=self.attn_implementation
                    )
                    return model.to(_device_for(self.device)).eval()
            return super()._load_model(model_id_and_revision, tqdm_class, progress_callback, gguf_file)

        @staticmethod
        def get_model_modality(model, processor=None):
            if getattr(getattr(model, "config", None), "model_type", None) == "hive":
                return Modality.VLM
            return base.get_model_modality(model, processor=processor)

    return HiveModelManager


def _device_for(device):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)


def _with_request_errors(build_server):
    """`build_server`, whose app answers a request the processor or the image loader refuses with a 400 naming
    the problem (OpenAI's error shape, so clients raise `BadRequestError` with this message)."""

    def build(*args, **kwargs):
        from fastapi.responses import JSONResponse

        app = build_server(*args, **kwargs)

        async def refused(_request, error: Exception):
            message = f"{type(error).__name__}: {error}"
            logger.warning("request refused: %s", message)
            body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}
            return JSONResponse(body, status_code=400)

        # ValueError: HiveProcessor's refusals (image count), base64 that does not decode; OSError: PIL's
        # UnidentifiedImageError for bytes that are no image, a local file that does not exist.
        app.add_exception_handler(ValueError, refused)
        app.add_exception_handler(OSError, refused)
        return app

    return build


def main(argv: list[str] | None = None) -> None:
    """`hive-serve DIR [options of transformers serve]`."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(flag in ("-h", "--help") for flag in args):
        return _run_serve(args)
    positional = [arg for arg in args if not arg.startswith("-")]
    if not positional:
        raise SystemExit(f"usage: {COMMAND} DIR [options of `transformers serve`]; DIR is a HIVE model directory")
    if any(arg == "--continuous-batching" for arg in args):
        raise SystemExit(f"{COMMAND}: {CONTINUOUS_BATCHING_REFUSAL}")
    directory = check_model_directory(positional[0])
    host = _option(args, "--host", "localhost")
    port = _option(args, "--port", "8000")
    say(f"serving {directory} at http://{host}:{port}/v1 (OpenAI-compatible; transformers serve)")
    _run_serve(args)


def _option(args: list[str], name: str, default: str) -> str:
    for index, arg in enumerate(args):
        if arg == name and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return default


def _run_serve(args: list[str]) -> None:
    import typer
    from transformers.cli.serve import Serve

    app = typer.Typer(add_completion=False)
    app.command(help=__doc__)(Serve)  # the one command: its options are transformers serve's own
    with hive_serving():
        app(args=args, prog_name=COMMAND)


if __name__ == "__main__":
    main()
