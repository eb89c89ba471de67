"""Tests run in LLaVA's pinned world (transformers 4.37.2), in the venv `make test` builds for it."""

import os
import sys
from pathlib import Path

import transformers

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tiny_models


def pytest_report_header(config):
    return f"transformers {transformers.__version__} (LLaVA's pinned world)"
