"""The VLM families at their real published sizes, on `meta` (no weights): HIVE wraps each, says its default levels,
and the committed real-size table (benchmarks/results/families/real_sizes.{json,md}) is what the code gives (issue 37).

The configs are typed in (benchmarks/family_size_configs.py, no hub access), each family naming the stored public
material its values were checked against; the parameter count of each model built from them, against its model
card's figure, is the check that the numbers are the published model's.
"""

from __future__ import annotations

import json

import pytest

import hive_adapter as hive
from benchmarks import family_sizes
from benchmarks.family_size_configs import FAMILIES, FROM_MEMORY, NOT_MEASURED

BY_NAME = {family.name: family for family in FAMILIES}
RESULTS = family_sizes.OUTPUT / "real_sizes.json"


def card_figure(published: str) -> float:
    """'8.29B' -> 8.29e9."""
    return float(published.rstrip("B")) * 1e9


@pytest.mark.parametrize("family", FAMILIES, ids=lambda family: family.name)
def test_family_at_real_size_wraps_on_meta(family):
    base = family_sizes.build_on_meta(family)
    parameters = sum(p.numel() for p in base.parameters())
    decimals = len(family.published_parameters.rstrip("B").partition(".")[2])
    assert round(parameters / 1e9, decimals) == card_figure(family.published_parameters) / 1e9, (
        f"{family.name}: {parameters:,} parameters, the card says {family.published_parameters}"
    )
    model = family_sizes.wrap_on_meta(base)
    layers = model.hive_layers
    assert layers.vision_layers[-1] == family.num_vision_layers - 1  # ~25% of the encoder, ending at the last layer
    assert len(layers.vision_layers) == round(0.25 * family.num_vision_layers) == len(layers.llm_layers)
    assert layers.llm_layers[0] == 0
    assert all(p.device.type == "meta" for _, p in model.hive_named_parameters())


def test_qwen2_5_vl_7b_wraps_on_meta_with_its_default_levels():
    """The plain call a user makes on a meta base (HIVE's modules made on the CPU, then moved to meta)."""
    base = family_sizes.build_on_meta(BY_NAME["Qwen2.5-VL-7B"])
    assert sum(p.numel() for p in base.parameters()) == 8_292_166_656  # the model card's 8.29B
    model = hive.get_hive_model(base)
    layers = model.hive_layers
    assert layers.vision_layers == (3, 7, 11, 15, 19, 23, 27, 31)  # 25% of 32 ViT blocks, ending at the last
    assert layers.llm_layers == (0, 3, 7, 10, 14, 17, 21, 24)
    assert model.hive_vision.reader.name == "qwen-packed-patches"
    assert model.hive_vision_shape.hidden_size == 1280 and model.hive_text_shape.hidden_size == 3584


def test_committed_table_covers_every_family_and_renders():
    committed = json.loads(RESULTS.read_text())
    rows = committed["rows"]
    assert [row["family"] for row in rows] == [family.name for family in FAMILIES]
    assert committed["skipped"] == NOT_MEASURED
    assert all(row["wraps"] for row in rows)
    markdown = family_sizes.render_markdown(rows, committed["skipped"])
    assert markdown == (family_sizes.OUTPUT / "real_sizes.md").read_text()  # the committed table is the rendered one
    for row in rows:
        assert f"| {row['family']} | {row['checkpoint']} |" in markdown


def test_committed_flops_are_what_the_counter_gives():
    """One family re-measured (the smallest): the committed numbers come from this code, not typed in."""
    committed = {row["family"]: row for row in json.loads(RESULTS.read_text())["rows"]}
    row = family_sizes.measure(BY_NAME["PaliGemma-3B"])
    assert row == committed["PaliGemma-3B"]
    # the family's connector puts 256 image positions into the decoder; HIVE's 7 blocks read them from the side
    assert row["hive_module_flops"] > 0 and row["family_connector_flops"] > 0
    assert row["hive_llm_side_flops"] - row["hive_module_flops"] == row["text_only_flops"]


def test_gemma_4_e2b_is_measured_with_its_per_layer_embeddings():
    """Gemma 4 E2B's decoder takes per-layer embeddings it would recover from `inputs_embeds` by a lookup that
    cannot run on meta (`nonzero`): the count gives them, as a lookup costs no FLOPs, and the row is what the code
    gives."""
    committed = {row["family"]: row for row in json.loads(RESULTS.read_text())["rows"]}
    row = family_sizes.measure(BY_NAME["Gemma-4-E2B"])
    assert row == committed["Gemma-4-E2B"]
    assert row["reader"] == "gemma4-positioned-patches"
    assert row["vision_layers"] == [3, 7, 11, 15] and row["num_llm_layers"] == 35
    assert 0 < row["family_connector_flops"] < row["hive_module_flops"]  # its norm + linear over 256 pooled tokens
    assert NOT_MEASURED == {}  # every family the contracts cover has its real-size row


def test_every_family_names_where_its_values_come_from():
    markdown = (family_sizes.OUTPUT / "real_sizes.md").read_text()
    for family in FAMILIES:
        assert family.source != FROM_MEMORY, f"{family.name}: no source named"
        assert f"- {family.name}: {family.source}" in markdown


def test_cli_refuses_an_unknown_family_and_a_file_as_output(tmp_path):
    with pytest.raises(SystemExit, match="Gemma-9"):
        family_sizes.main(["--families", "Gemma-9"])
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    with pytest.raises(SystemExit, match="is a file"):
        family_sizes.main(["--output_dir", str(not_a_dir), "--families", "PaliGemma-3B"])


def test_cli_writes_the_table_for_chosen_families(tmp_path):
    family_sizes.main(["--output_dir", str(tmp_path), "--families", "PaliGemma-3B"])
    written = json.loads((tmp_path / "real_sizes.json").read_text())
    assert [row["family"] for row in written["rows"]] == ["PaliGemma-3B"]
    assert "| PaliGemma-3B | google/paligemma-3b-pt-224 |" in (tmp_path / "real_sizes.md").read_text()
