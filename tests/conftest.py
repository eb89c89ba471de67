import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))


def pytest_configure(config):
    # Marks used by transformers' common tests (tests/test_transformers_common.py runs them).
    for mark in ("flash_attn_test", "flash_attn_3_test", "flash_attn_4_test", "torch_compile_test", "flaky"):
        config.addinivalue_line("markers", f"{mark}: used by transformers' common model tests")
    config.addinivalue_line("markers", "fault_soak: 20 random kills of hive-train (opt in with --fault-soak)")


def pytest_addoption(parser):
    parser.addoption("--fault-soak", action="store_true", help="run the 20-kill fault-injection soak (minutes)")


def pytest_collection_modifyitems(config, items):
    import pytest

    if config.getoption("--fault-soak"):
        return
    skip = pytest.mark.skip(reason="the 20-kill soak runs with --fault-soak")
    for item in items:
        if "fault_soak" in item.keywords:
            item.add_marker(skip)
