"""Linear probe (Table 4) and the small-scale rerun of the comparison."""

import json
import math
import random

import pytest
from hive_checkpoints import save_hive_checkpoint, toy_models
from PIL import Image

from hive_adapter.analysis import ProbeConfig, built_in, image_folder, linear_probe, load_frozen_encoder
from hive_adapter.analysis.augment import Table4Augment
from hive_adapter.analysis.probe import main as probe_main
from hive_adapter.analysis.probe_features import encode


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return toy_models(tmp_path_factory.mktemp("toy"))


def write_easy_split(root, per_class):
    """Red things vs blue things on noisy grey: any encoder separates them."""
    rng = random.Random(0)
    for split, count in (("train", per_class), ("test", per_class // 2)):
        for name, colour in (("blue", (30, 60, 220)), ("red", (220, 40, 30))):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for index in range(count):
                image = Image.new("RGB", (32, 32), tuple(rng.randint(150, 230) for _ in range(3)))
                left, top = rng.randint(0, 16), rng.randint(0, 16)
                image.paste(colour, (left, top, left + 14, top + 14))
                image.save(root / split / name / f"{index:03d}.png")
    return root / "train", root / "test"


def test_table4_augmentation_crops_within_its_scale_and_ratio():
    augment = Table4Augment(size=(32, 32))
    rng = random.Random(0)
    for _ in range(200):
        left, top, right, bottom = augment.crop_box(64, 48, rng)
        width, height = right - left, bottom - top
        assert 0 <= left < right <= 64 and 0 <= top < bottom <= 48
        assert 0.4 * 64 * 48 * 0.9 <= width * height <= 64 * 48
        assert 0.75 * 0.9 <= width / height <= 1.33 * 1.1
    image = Image.new("RGB", (64, 48), (10, 200, 30))
    out = augment(image, random.Random(1))
    assert out.size == (32, 32) and out.mode == "RGB"
    assert augment(image, random.Random(1)).tobytes() == out.tobytes()  # seeded: reproducible


def test_probe_separates_an_easy_split_from_the_command_line(models, tmp_path, capsys):
    train, test = write_easy_split(tmp_path / "data", per_class=24)
    output = tmp_path / "probe.json"
    probe_main([str(models[0]), "--train", str(train), "--test", str(test), "--epochs", "100", "--batch_size", "16",
                "--output", str(output)])  # fmt: skip
    report = json.loads(output.read_text())
    assert report["classes"] == ["blue", "red"]
    assert report["test_images"] == 24 and report["train_images"] == 48
    assert report["test_accuracy"] >= 0.8, report  # chance is 0.5 (a random tiny encoder gets 0.875)
    assert report["config"]["augment"] is True and report["config"]["learning_rate"] == 2e-4
    assert "top-1 accuracy" in capsys.readouterr().out


def test_probe_on_the_bundled_digits_beats_chance(models):
    encoder, processor = load_frozen_encoder(models[0])
    train, test = built_in("digits")
    assert len(train) + len(test) == 1797 and train.classes == [str(d) for d in range(10)]
    result = linear_probe(encoder, processor, train, test, ProbeConfig(epochs=60, batch_size=64, augment=False))
    assert result.test_accuracy > 0.3, result  # chance 0.1, even for a random tiny encoder
    assert result.steps == 60 * 23


def test_probe_reads_hive_checkpoints_and_full_clip_models(models, tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    hive_dir = save_hive_checkpoint(models, tmp_path / "hive")
    encoder, _ = load_frozen_encoder(hive_dir)
    assert type(encoder).__name__ == "SiglipVisionModel"
    assert not any(p.requires_grad for p in encoder.parameters())

    clip = CLIPModel(CLIPConfig(
        text_config=CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2).to_dict(),
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                       image_size=32, patch_size=8).to_dict(),
    ))  # fmt: skip
    clip.save_pretrained(tmp_path / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tmp_path / "clip"
    )
    encoder, processor = load_frozen_encoder(tmp_path / "clip")
    assert type(encoder).__name__ == "CLIPVisionModel"
    train, test = built_in("shapes", size=16)
    assert linear_probe(encoder, processor, train, test, ProbeConfig(epochs=2, batch_size=8)).train_images == 16


def test_probe_names_bad_inputs(models, tmp_path):
    train, test = write_easy_split(tmp_path / "data", per_class=2)
    (test / "green").mkdir()
    (test / "green" / "x.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"classes \['green'\] are not among the training classes"):
        image_folder(test, classes=["blue", "red"])
    (train / "empty").mkdir()
    with pytest.raises(ValueError, match="class 'empty' holds no images"):
        image_folder(train)
    with pytest.raises(ValueError, match="features='max'"):
        ProbeConfig(features="max")
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        load_frozen_encoder(tmp_path)
    with pytest.raises(SystemExit):
        probe_main([str(models[0]), "--dataset", "digits", "--train", str(train)])


def test_probe_reads_any_encoder_layer(models, tmp_path, capsys):
    """`layer=k` probes the output of encoder layer k (0-based, before the encoder's final norm): what the
    encoder study compares layer by layer. Each layer gives its own features; out of range is refused."""
    import torch

    encoder, processor = load_frozen_encoder(models[0])
    images = [Image.new("RGB", (32, 32), (40 * i, 100, 200 - 30 * i)) for i in range(4)]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        states = encoder(pixel_values=pixels, output_hidden_states=True).hidden_states  # embeddings + each layer
    depth = encoder.config.num_hidden_layers
    for layer in (0, depth - 1):
        torch.testing.assert_close(encode(encoder, processor, images, features="mean", layer=layer),
                                   states[layer + 1].mean(1))  # fmt: skip
    assert not torch.allclose(encode(encoder, processor, images, features="mean", layer=0),
                              encode(encoder, processor, images, features="mean"))  # fmt: skip
    with pytest.raises(ValueError, match=rf"layer=99: the encoder has {depth} layers \(0 to {depth - 1}\)"):
        encode(encoder, processor, images, features="mean", layer=99)
    with pytest.raises(ValueError, match="layer=-1: must be 0 or more"):
        ProbeConfig(layer=-1)
    with pytest.raises(ValueError, match="features='pooler' reads the encoder's output"):
        ProbeConfig(layer=0, features="pooler")
    train, test = write_easy_split(tmp_path / "data", per_class=12)
    with pytest.raises(SystemExit):
        probe_main([str(models[0]), "--train", str(train), "--test", str(test), "--layer", "99"])
    assert f"--layer 99: {models[0]} has {depth} layers" in capsys.readouterr().err
    out = tmp_path / "probe.json"
    probe_main([str(models[0]), "--train", str(train), "--test", str(test), "--layer", "0", "--epochs", "20",
                "--batch_size", "8", "--no_augment", "--output", str(out)])  # fmt: skip
    report = json.loads(out.read_text())
    assert report["config"]["layer"] == 0 and report["test_accuracy"] >= 0.75  # red vs blue: an early layer sees it


def test_hive_reproduce_writes_its_table_and_figures(tmp_path):
    from hive_adapter.analysis.reproduce import main as reproduce

    out = tmp_path / "out"
    reproduce(["--quick", "--output_dir", str(out), "--seeds", "0,1", "--train_size", "32", "--held_out_size", "8",
               "--gradient_samples", "2", "--probe_size", "16", "--probe_epochs", "2", "--language_pretraining_steps",
               "2", "--vision_pretraining_steps", "2", "--connectors", "hive,hive_lean,concat",
               "--curve_steps", "25"])  # fmt: skip
    report = json.loads((out / "reproduce.json").read_text())
    assert set(report["results"]) == {"hive", "hive_lean", "concat"} and report["budget"]["seeds"] == [0, 1]
    lean, hive = report["results"]["hive_lean"], report["results"]["hive"]
    assert lean["gflops_without_tower"] < hive["gflops_without_tower"]  # the lean projector, trained as a variant
    assert set(report["timings"]) == {
        "pretraining", "training", "probes", "evaluation", "costs", "learning curves", "figures"
    }  # fmt: skip
    # the encoder: every layer probed, under both stage-3 budgets, with each layer's weight change
    study = report["encoder_quality"]
    assert set(study["budgets"]) == {"Table 3", "encoder lr 0.0002, 1 epochs"}
    for connectors in study["budgets"].values():
        assert set(connectors) == {"hive", "hive_lean", "concat"}
        for row in connectors.values():
            assert set(row["tasks"]) == {"shapes", "digits", "shades"}
            assert len(row["tasks"]["shades"]["layer_gains"]) == 8 and len(row["change"]["layers"]) == 8
            assert len(row["tasks"]["digits"]["gain"]["values"]) == 2  # paired per seed
    table3, moving = (study["budgets"][label]["hive"]["change"]["total"]["mean"] for label in study["budgets"])
    assert moving > 20 * table3 > 0  # the second budget moves the encoder; Table 3's barely does
    assert len(study["verdicts"]) == 2 * 3  # per budget and task
    # learning curves: one per connector and seed on the quick task, own and swapped pictures
    curves = report["learning_curves"]["table"]["default"]["colour"]
    assert set(curves) == {"hive", "hive_lean", "concat"} and curves["hive"]["seeds"] == [0, 1]
    assert (out / "learning_curves" / "learning_curves.png").stat().st_size > 1000
    assert len(report["start_probe"]["shapes"]["values"]) == 2  # the encoder each seed started from
    for row in report["results"].values():
        gradients = row["gradients"]
        assert len(gradients["relative_grad_norm"]) == 8 and len(gradients["object_share"]) == 8  # 8 encoder layers
        assert gradients["relative_grad_norm"][0] == pytest.approx(
            gradients["grad_norm"][0] / gradients["text_input_grad_norm"], rel=0.5
        )  # a mean of ratios against a ratio of means
        reading = row["image_reading"]
        assert len(reading["real"]["content"]["values"]) == 2 and 0 <= reading["swapped"]["structural"]["mean"] <= 1
        assert set(row["image_reading_by_stage"]) == {"1", "2", "3"}
        assert 0 <= row["probe"]["digits"]["mean"] <= 1 and row["gflops"] > row["gflops_without_tower"] > 0
    entropy = report["results"]["hive"]["cross_attention"]
    assert len(entropy["attention_entropy"]) == 4 and entropy["uniform_entropy"] == pytest.approx(math.log(16))
    assert all(0 < value <= math.log(16) + 1e-4 for value in entropy["attention_entropy"])
    assert "cross_attention" not in report["results"]["concat"]
    table = (out / "reproduce.md").read_text()
    assert "| hive |" in table and "| concat |" in table and "hive-reproduce --quick --output_dir" in table
    assert "content, swapped image" in table and "±" in table  # two seeds: mean ± spread
    assert "## The encoder: starting vs exported, per layer" in table and "## Sample efficiency" in table
    (out / "reproduce.md").unlink()  # --report_only renders the same report from reproduce.json, training nothing
    reproduce(["--report_only", "--output_dir", str(out)])
    assert (out / "reproduce.md").read_text() == table
    with pytest.raises(SystemExit, match=r"--report_only needs .*reproduce.json"):
        reproduce(["--report_only", "--output_dir", str(tmp_path / "nothing")])
    figures = ("image_reading.png", "gradient_norms.png", "gradient_object_share.png", "gradient_maps.png",
               "attention_entropy.png", "attention_maps.png", "encoder_probe_layers.png")  # fmt: skip
    for figure in figures:
        assert (out / figure).stat().st_size > 1000
