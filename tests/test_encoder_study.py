"""Issue 25's measurements: per-layer encoder probes, per-layer weight change, learning curves.

Not timing tests: each checks that a measurement measures what it says (a probe trained beside others is the
probe trained alone, a weight change lands on the layer that moved, a learning-curve task is decided by its
picture and its control is not, a curve's steps-to-X is read off the curve).
"""

import copy
import json

import pytest
import torch
from hive_checkpoints import toy_models
from torch import nn

from hive_adapter.analysis import curve_runs, encoder_quality, learning_curves
from hive_adapter.analysis.probe import (
    ProbeConfig,
    StackedLinearProbes,
    load_frozen_encoder,
    probe_layers,
)
from hive_adapter.analysis.probe_data import SHADES, built_in


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return toy_models(tmp_path_factory.mktemp("toy"))


# ---------------------------------------------------------------------- the probes
def test_stacked_probes_train_exactly_as_each_probe_trained_alone():
    """Three probes in one optimiser step == three separate (BatchNorm, Linear) probes, each with its own AdamW and
    its own gradient clipping; clipping is active (a global clip over the three would fail this)."""
    torch.manual_seed(0)
    count, width, classes, batch = 3, 6, 4, 16
    features = torch.randn(64, count, width) * torch.tensor([1.0, 10.0, 100.0])[None, :, None]  # unequal scales
    labels = torch.randint(0, classes, (64,))
    stacked = StackedLinearProbes(count, width, classes, seed=0)
    alone = []
    for k in range(count):
        head = nn.Sequential(nn.BatchNorm1d(width, affine=False), nn.Linear(width, classes))
        with torch.no_grad():
            head[1].weight.copy_(stacked.weight[k].T)
            head[1].bias.copy_(stacked.bias[k])
        alone.append(head)

    def optimiser(weight, bias):
        return torch.optim.AdamW(
            [{"params": [weight], "weight_decay": 0.01}, {"params": [bias], "weight_decay": 0.0}], lr=0.05
        )

    stacked_opt = optimiser(stacked.weight, stacked.bias)
    alone_opts = [optimiser(h[1].weight, h[1].bias) for h in alone]
    clipped = 0
    for step in range(12):
        index = torch.arange(step * 5, step * 5 + batch) % 64
        logits = stacked(features[index])
        per_layer = nn.functional.cross_entropy(
            logits.transpose(1, 2), labels[index, None].expand(-1, count), reduction="none"
        ).mean(0)
        stacked_opt.zero_grad()
        per_layer.sum().backward()
        stacked.clip_each(0.5)
        stacked_opt.step()
        for k, (head, opt) in enumerate(zip(alone, alone_opts, strict=True)):
            loss = nn.functional.cross_entropy(head(features[index, k]), labels[index])
            assert loss.item() == pytest.approx(per_layer[k].item(), rel=1e-5, abs=1e-6)
            opt.zero_grad()
            loss.backward()
            clipped += float(nn.utils.clip_grad_norm_(head.parameters(), 0.5)) > 0.5
            opt.step()
    assert clipped >= 6  # the clip was doing something
    for k, head in enumerate(alone):
        torch.testing.assert_close(stacked.weight[k].detach(), head[1].weight.detach().T, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(stacked.bias[k].detach(), head[1].bias.detach(), rtol=1e-4, atol=1e-5)


def test_probing_every_layer_at_once_gives_each_layers_probe_alone(models):
    encoder, processor = load_frozen_encoder(models[0])
    train, test = built_in("shades", seed=0, size=48)
    config = ProbeConfig(epochs=6, batch_size=16, augment=False, learning_rate=0.05)  # moves in few steps
    together = probe_layers(encoder, processor, train, test, [0, 3, None], config, progress=False)
    for layer, result in zip([0, 3, None], together, strict=True):
        (alone,) = probe_layers(encoder, processor, train, test, [layer], config, progress=False)
        assert result.test_accuracy == alone.test_accuracy and result.train_accuracy == alone.train_accuracy
        assert result.losses == pytest.approx(alone.losses, rel=1e-5)
    assert together[0].losses != pytest.approx(together[1].losses, rel=1e-3)  # different layers, different probes
    with pytest.raises(ValueError, match=r"layer=9: the encoder has 4 layers"):
        probe_layers(encoder, processor, train, test, [9], config, progress=False)


def test_the_shades_set_is_fine_grained_and_its_splits_differ():
    train, test = built_in("shades", seed=0, size=90)
    assert len(train.classes) == 18 and len(test) == 22
    steps = [
        b - a for first, second in zip(SHADES[:-1], SHADES[1:], strict=True) for a, b in zip(first, second, strict=True)
    ]
    assert steps == [14] * 15  # 6 shades, each 14 units from the next on every channel
    assert len(set(train.labels)) >= 15  # nearly every class drawn in 90 pictures
    assert train.load(0).tobytes() != test.load(0).tobytes()
    assert built_in("shades", seed=0, size=90)[0].load(5).tobytes() == train.load(5).tobytes()  # deterministic


def test_layer_change_lands_on_the_layer_that_moved(models, tmp_path):
    from transformers import AutoImageProcessor

    encoder, _ = load_frozen_encoder(models[0])
    assert encoder_quality.layer_change(models[0], models[0])["total"] == 0.0
    moved = copy.deepcopy(encoder)
    with torch.no_grad():
        for parameter in moved.get_submodule(next(n for n, _ in moved.named_modules() if n.endswith("encoder.layers")))[
            2
        ].parameters():
            parameter.mul_(1.1)  # layer 3 (1-based) moves by 10%
    moved.save_pretrained(tmp_path / "moved")
    AutoImageProcessor.from_pretrained(models[0]).save_pretrained(tmp_path / "moved")
    change = encoder_quality.layer_change(models[0], tmp_path / "moved")
    assert change["layers"][2] == pytest.approx(0.1, rel=1e-4)
    assert [value for k, value in enumerate(change["layers"]) if k != 2] == [0.0] * (len(change["layers"]) - 1)
    assert change["embeddings"] == 0.0 and 0 < change["total"] < 0.1


def test_gains_are_paired_per_seed_and_the_verdict_is_a_paired_test():
    def probes(*accuracies):
        return [{"digits": {"layers": [a, a], encoder_quality.OUTPUT: a}} for a in accuracies]

    change = [{"total": 0.1, "layers": [0.1, 0.1], "embeddings": 0.1}] * 3
    start = probes(0.50, 0.60, 0.70)
    hive = encoder_quality.summarise(start, probes(0.55, 0.65, 0.75), change)  # +5 on every seed
    concat = encoder_quality.summarise(start, probes(0.51, 0.61, 0.71), change)  # +1 on every seed
    assert hive["tasks"]["digits"]["gain"]["mean"] == pytest.approx(0.05)
    assert hive["tasks"]["digits"]["gain"]["sd"] == pytest.approx(0.0, abs=1e-12)  # paired: the seeds agree
    budgets = {"Table 3": {"hive": hive, "concat": concat}}
    (verdict,) = encoder_quality.verdicts(budgets, ["digits"])
    assert "greater than concat at p < 0.05" in verdict and "own gain" not in verdict
    noisy = encoder_quality.summarise(start, probes(0.60, 0.60, 0.75), change)  # +10, 0, +5: spread 5
    (verdict,) = encoder_quality.verdicts({"Table 3": {"hive": noisy, "concat": concat}}, ["digits"])
    assert "not shown greater than concat" in verdict and "paired t-test over 3 seeds, one-sided p 0.15" in verdict
    table = encoder_quality.markdown(encoder_quality.summarise_start(start), budgets)
    assert "| Table 3 | hive | 10% | 65.0% ± 10.0 (+5.0 ± 0.0) |" in table


# ---------------------------------------------------------------------- learning curves
def picture_features(pixels: torch.Tensor):
    """What a reader of the picture alone sees, position-normalised: the object's ink cropped at its top-left
    corner (shape, texture, digit), its mean colour, and the quadrant of its centre."""
    rows = []
    for image in pixels:  # (3, 32, 32), background exactly 0
        ink = image.abs().sum(0) > 0  # (32, 32)
        ys, xs = ink.nonzero(as_tuple=True)
        top, left = int(ys.min()), int(xs.min())
        crop = torch.zeros(16, 16)
        window = ink[top : top + 16, left : left + 16].float()
        crop[: window.shape[0], : window.shape[1]] = window
        colour = image[:, ink].mean(1)  # (3,)
        quadrant = torch.zeros(4)
        quadrant[2 * int(ys.float().mean() >= 16) + int(xs.float().mean() >= 16)] = 1
        rows.append(torch.cat([crop.flatten(), colour, quadrant]))
    return torch.stack(rows).numpy()


@pytest.mark.parametrize("task", learning_curves.TASKS)
def test_each_task_is_decided_by_its_picture_and_not_by_another(task):
    from sklearn.linear_model import LogisticRegression

    train = learning_curves.image_task(task, 600, seed=0)
    held_out = learning_curves.image_task(task, 200, seed=1, held_out=True)
    answers = learning_curves.ANSWERS[task]
    flat = {name: picture_features(data["pixel_values"]) for name, data in (("train", train), ("held", held_out))}
    target = {name: data["input_ids"][:, 2].numpy() for name, data in (("train", train), ("held", held_out))}
    assert set(target["train"]) == set((curve_runs.FIRST_ANSWER + torch.arange(answers)).tolist())
    assert (train["labels"][:, :2] == -100).all() and (train["labels"][:, 2] == train["input_ids"][:, 2]).all()
    reader = LogisticRegression(max_iter=300).fit(flat["train"], target["train"])
    own = reader.score(flat["held"], target["held"])
    swapped = reader.score(flat["held"][list(range(1, 200)) + [0]], target["held"])  # picture i + 1
    assert own >= 0.6, f"{task}: pixels decide the answer only {own:.0%} of the time"
    assert swapped <= 1 / answers + 0.12, f"{task}: another picture still gives the answer {swapped:.0%}"


def test_held_out_digits_are_other_scans():
    train_scans, _ = curve_runs._digit_images(held_out=False)
    held_scans, _ = curve_runs._digit_images(held_out=True)
    seen = {scan.numpy().tobytes() for scan in train_scans}
    assert len(train_scans) + len(held_scans) == 1797
    assert sum(scan.numpy().tobytes() in seen for scan in held_scans) < 5  # (a few scans are duplicates in sklearn)


def test_steps_to_is_the_first_evaluation_at_the_threshold():
    curve = [(0, 0.1), (25, 0.85), (50, 0.92), (75, 0.89), (100, 0.97)]
    assert learning_curves.steps_to(curve, 0.9) == 50 and learning_curves.steps_to(curve, 0.95) == 100
    assert learning_curves.steps_to(curve, 0.99) is None


def test_a_curve_run_is_measured_with_its_control_and_kept(tmp_path):
    run = learning_curves.CurveRun(task="colour", connector="concat", seed=0, steps=50, eval_every=25,
                                   train_size=256, held_out_size=64)  # fmt: skip
    (result,) = learning_curves.run_all([run], tmp_path)
    assert [step for step, _ in result["own"]] == [0, 25, 50] == [step for step, _ in result["swapped"]]
    assert result["own"][-1][1] >= 0.9 and result["swapped"][-1][1] <= 1 / 8 + 0.15  # learned, from the picture
    assert result["steps_to"]["90%"] == learning_curves.steps_to(result["own"], 0.9)
    written = tmp_path / "runs" / f"{run.name}.json"
    stamp = written.stat().st_mtime_ns
    assert learning_curves.run_all([run], tmp_path) == [json.loads(written.read_text())]
    assert written.stat().st_mtime_ns == stamp  # a finished run is reused, not trained again
    written.write_text("{truncated")  # a damaged record is trained again, not a crash
    assert learning_curves.run_all([run], tmp_path)[0]["own"] == result["own"]
    summary = learning_curves.write_summary([result], tmp_path, 50)
    assert summary["ratio_to_concat_90"]["default"]["colour"]["concat"] == 1.0
    assert "| colour | concat |" in (tmp_path / "curves.md").read_text()
