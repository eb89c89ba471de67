"""The documentation site (mkdocs.yml, docs/): it builds with `--strict` (no broken link, no missing API symbol),
its command-line pages are generated from the commands' own parsers, and every tested block on every page runs
as written (tests/doc_blocks.py: the README's runner)."""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import subprocess
import sys

import pytest
from doc_blocks import DOCS, ROOT, block_id, python_blocks, run_python_block, run_shell_blocks, shell_blocks, site_pages

PAGES = site_pages()
PYTHON_BLOCKS = [(page, index) for page in PAGES for index in range(len(python_blocks(page)))]
sys.path.insert(0, str(DOCS / "hooks"))
import cli_reference  # noqa: E402  (docs/hooks: the build's own generator)


def test_the_site_has_tested_blocks():
    assert len(PYTHON_BLOCKS) >= 5, PYTHON_BLOCKS
    assert sum(len(shell_blocks(page)) for page in PAGES) >= 8


@pytest.mark.parametrize(("page", "index"), PYTHON_BLOCKS, ids=[block_id(p, i) for p, i in PYTHON_BLOCKS])
def test_page_python_block_runs(page, index, tmp_path):
    run_python_block(python_blocks(page)[index], tmp_path)


def test_site_shell_blocks_run_in_reading_order(tmp_path):
    """The `# (tested)` shell blocks of every page, in the site's order, in one scratch directory."""
    run_shell_blocks([block for page in PAGES for block in shell_blocks(page)], tmp_path)
    assert (tmp_path / "run" / "stage3" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "stage4" / "model.safetensors").is_file()
    assert (tmp_path / "vision_encoder" / "config.json").is_file()
    gradients = json.loads((tmp_path / "analysis" / "gradients.json").read_text())
    assert len(gradients["layers"]) == 8 and (tmp_path / "analysis" / "attention.png").is_file()
    assert json.loads((tmp_path / "analysis" / "probe.json").read_text())["classes"] == [
        "circle",
        "cross",
        "square",
        "triangle",
    ]
    assert (tmp_path / "run_zero3" / "stage1" / "model.safetensors").is_file()
    assert (tmp_path / "run_fsdp" / "stage1" / "model.safetensors").is_file()
    assert (tmp_path / "checkpoints" / "llava-hive-pretrain" / "mm_projector.bin").is_file()
    assert (tmp_path / "checkpoints" / "llava-hive" / "model.safetensors").is_file()


@pytest.fixture(scope="module")
def built_site(tmp_path_factory):
    site = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return site


def test_the_site_builds_strict(built_site):
    for page in ("index.html", "quick-tour/index.html", "ARCHITECTURE/index.html", "reference/api/index.html"):
        assert (built_site / page).is_file(), page
    api = "".join((built_site / "reference" / page / "index.html").read_text() for page in ("api", "config"))
    import hive_adapter

    for name in hive_adapter.__all__:
        assert name == "__version__" or f'id="hive_adapter.{name}"' in api, name


def option_strings(parser) -> list[str]:
    """Every option of an argparse parser (its subcommands' too) or a click command, but --help."""
    if hasattr(parser, "params"):  # click (hive-serve: typer's app over transformers serve)
        return [option for param in parser.params for option in param.opts if option.startswith("-")]
    options = []
    for action in parser._actions:
        options += [option for option in action.option_strings if option not in ("-h", "--help")]
        if isinstance(action, argparse._SubParsersAction):
            options += [option for subparser in action.choices.values() for option in option_strings(subparser)]
    return options


def test_every_command_flag_is_on_the_generated_page(built_site):
    """Each flag the commands' parsers accept is on reference/cli, and the page's source holds none by hand."""
    source = (DOCS / "reference" / "cli.md").read_text()
    assert not re.search(r"^\|\s*`--", source, flags=re.M), "reference/cli.md lists flags by hand"
    page = html.unescape((built_site / "reference" / "cli" / "index.html").read_text())
    checked = 0
    for name in cli_reference.COMMANDS:
        assert f"<!-- cli: {name} -->" in source, name
        flags = [flag for parser in cli_reference.command_parsers(name) for flag in option_strings(parser)]
        checked += len(flags)
        aliases = {f for f in flags if "--" + f[2:].replace("-", "_") in flags and f[2:].replace("-", "_") != f[2:]}
        missing = [flag for flag in flags if flag not in aliases and f"<code>{flag}</code>" not in page]
        assert not missing, (name, missing)
    assert checked > 300, checked  # hive-train alone has its own ~30 and TrainingArguments' ~120


def test_every_console_script_is_documented():
    scripts = re.findall(r'"(hive-[\w-]+)=', (ROOT / "setup.py").read_text())
    assert len(scripts) >= 8 and set(scripts) <= set(cli_reference.COMMANDS), sorted(
        set(scripts) - set(cli_reference.COMMANDS)
    )


def test_pages_name_real_make_targets():
    makefile = (ROOT / "Makefile").read_text()
    for page in PAGES:
        for target in re.findall(r"^make (\w[\w-]*)", page.read_text(), flags=re.M):
            assert re.search(rf"^{target}:", makefile, flags=re.M), (page.name, target)
