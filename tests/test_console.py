"""What the tools print: bars only on a terminal, DeepSpeed's CPU notice filtered where it is raised."""

import logging

import hive_adapter  # noqa: F401  (installs the filter)
from hive_adapter.utils import console


def records_of(logger: logging.Logger, emit) -> list[str]:
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Keep(level=logging.DEBUG)
    logger.addHandler(handler)
    try:
        emit()
    finally:
        logger.removeHandler(handler)
    return seen


def test_deepspeeds_cpu_notice_is_dropped_and_its_other_warnings_pass():
    logger = logging.getLogger("DeepSpeed")
    notice = "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it."
    assert records_of(logger, lambda: logger.warning(notice)) == []
    assert records_of(logger, lambda: logger.warning("ZeRO-3 is on")) == ["ZeRO-3 is on"]
    console.drop_deepspeed_cpu_notice()  # a second call adds no second filter
    assert sum(isinstance(f, console._DropDeepSpeedCpuNotice) for f in logger.filters) == 1


def test_progress_is_a_bar_on_a_terminal_only(monkeypatch):
    monkeypatch.setattr(console, "on_a_terminal", lambda: False)
    assert type(console.progress(range(3), description="x")).__name__ == "range_iterator"
    monkeypatch.setattr(console, "on_a_terminal", lambda: True)
    bar = console.progress(range(3), description="x")
    assert list(bar) == [0, 1, 2]


def test_tools_that_reload_models_turn_the_loading_bars_off(monkeypatch):
    from transformers.utils import logging as hf_logging

    monkeypatch.setattr(console, "on_a_terminal", lambda: True)
    hf_logging.enable_progress_bar()
    try:
        console.quiet_progress_bars()
        assert hf_logging.is_progress_bar_enabled()  # a terminal, one load: the bar stays
        console.quiet_progress_bars(reloads_models=True)
        assert not hf_logging.is_progress_bar_enabled()
        hf_logging.enable_progress_bar()
        monkeypatch.setattr(console, "on_a_terminal", lambda: False)
        console.quiet_progress_bars()
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()
