import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if "PYTEST_XDIST_WORKER" in os.environ:
    # `make test-main` runs the suite in 2 xdist workers on 2 cores: one torch thread each (and in the processes
    # they start), else each worker's torch takes every core and the two fight over them. Set before torch loads.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="module")
def instruction_toy(tmp_path_factory):
    """Toy vision and language models (`hive_adapter.tools.toy_models`) whose tokenizer has the synthetic
    conversations' words."""
    from hive_checkpoints import SIZES

    from hive_adapter.data.conversations import instruction_vocabulary
    from hive_adapter.tools.toy_models import write_toy_models

    return write_toy_models(tmp_path_factory.mktemp("toy"), instruction_vocabulary(), sizes=SIZES)


@pytest.fixture(scope="module")
def instruction_processor(instruction_toy):
    """A marker-mode `HiveProcessor` (`<image>`, LLaVA's chat template) of the instruction toy models."""
    from transformers import AutoImageProcessor, AutoTokenizer

    import hive_adapter as hive

    vision, language = instruction_toy
    return hive.HiveProcessor(AutoImageProcessor.from_pretrained(vision), AutoTokenizer.from_pretrained(language))


@pytest.fixture(scope="session")
def family_bases():
    """One tiny base per VLM family (tests/family_models.py) for the whole session, built when first asked for."""
    from family_models import FAMILIES

    built = {}

    def base(name: str):
        if name not in built:
            built[name] = FAMILIES[name].build()
        return built[name]

    return base


@pytest.fixture(scope="session")
def family_wrapped(family_bases):
    """One HIVE adapter per family around its session base (levels 1 and 3); tests that open the gates close them."""
    import hive_adapter as hive

    wrapped = {}

    def model(name: str):
        if name not in wrapped:
            wrapped[name] = hive.get_hive_model(family_bases(name), hive.HiveConfig(vision_layers=[1, 3]))
        return wrapped[name]

    return model


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
