"""What the evaluation figures show, read from matplotlib's objects and checked against scikit-learn:
undefined AUROCs apart from an AUROC of 0, per-bin case counts in the calibration curves, and short
run labels in the legends."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pytest
from matplotlib.colors import to_rgba
from matplotlib.container import BarContainer
from sklearn.calibration import calibration_curve
from sklearn.metrics import roc_auc_score

from mdfnet_hydra.evaluation import figures
from mdfnet_hydra.evaluation.analysis import analyse
from mdfnet_hydra.evaluation.runs import Run
from mdfnet_hydra.labels import CHEXPERT_LABELS
from mdfnet_hydra.predictions import Predictions

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

FRACTURE = CHEXPERT_LABELS.index("Fracture")
EDEMA = CHEXPERT_LABELS.index("Edema")
N = 400


@pytest.fixture
def drawn(monkeypatch):
    """Figures by file name, kept open instead of saved."""
    kept: dict[str, object] = {}

    def keep(fig, path):
        kept[Path(path).name] = fig
        return path

    monkeypatch.setattr(figures, "_save", keep)
    yield kept
    for fig in kept.values():
        plt.close(fig)


def result(name, modalities, seed, probs, targets, stage="stage2"):
    run = Run(
        name=name, directory=Path("/nonexistent") / name, stage=stage, modalities=modalities, config={}, seed=seed
    )
    test = Predictions(
        probs.astype(np.float32),
        targets.astype(np.float32),
        np.ones_like(targets, dtype=np.float32),
        np.array([f"s{i:04d}" for i in range(len(targets))]),
        np.arange(len(targets)),
    )
    return analyse(run, test, None, "youden", 0.9, 0, 0)


def data(seed, inverted=()):
    """Probabilities skewed towards 0 (so the upper calibration bins hold few cases), labels drawn
    from them; Fracture has no positive (undefined AUROC); `inverted` labels rank every positive
    below every negative (AUROC exactly 0)."""
    rng = np.random.default_rng(seed)
    probs = rng.beta(1.2, 4.0, size=(N, 14))
    targets = (rng.random((N, 14)) < probs).astype(float)
    targets[:, FRACTURE] = 0
    for j in inverted:
        targets[:, j] = rng.random(N) < 0.3
        probs[:, j] = np.where(targets[:, j] > 0, 0.05 + 0.4 * rng.random(N), 0.5 + 0.45 * rng.random(N))
    return probs, targets


def centre(patch) -> float:
    return patch.get_x() + patch.get_width() / 2


def test_auroc_bars_tell_undefined_from_zero(drawn, tmp_path):
    runs = [
        result(
            "sweeps/random-all-two_stage/3_a1b2c3d4/stage2",
            ["vision", "text", "clinical"],
            0,
            *data(1, inverted=[EDEMA]),
        ),
        result("sweeps/random-vision-two_stage/1_00ff00ff/stage2", ["vision"], 0, *data(2)),
    ]
    figures.auroc_bars(runs, tmp_path)
    ax = drawn["auroc_by_label.png"].axes[0]
    bottom = ax.get_ylim()[0]
    assert bottom < 0, "the axis starts below 0 so that an AUROC of 0 is a bar"
    bars = {
        c.get_label(): c for c in ax.containers if isinstance(c, BarContainer) and not c.get_label().startswith("_")
    }
    assert set(bars) == {"all stage2 s0", "vision stage2 s0"}, "short labels, not run paths"
    for r, label in zip(runs, ["all stage2 s0", "vision stage2 s0"]):
        tops = {round(centre(p)): p.get_y() + p.get_height() for p in bars[label].patches}
        assert FRACTURE not in tops, "no bar for an undefined AUROC"
        expected = {j: roc_auc_score(r.test.targets[:, j], r.test.probs[:, j]) for j in range(14) if j != FRACTURE}
        for j, value in expected.items():
            assert tops[j] == pytest.approx(value, abs=1e-6), CHEXPERT_LABELS[j]
        assert tops[14] == pytest.approx(np.mean(list(expected.values())), abs=1e-6), "the mean"
        for p in bars[label].patches:
            assert p.get_y() == pytest.approx(bottom) and p.get_facecolor()[3] > 0
    zero = next(p for p in bars["all stage2 s0"].patches if round(centre(p)) == EDEMA)
    assert roc_auc_score(runs[0].test.targets[:, EDEMA], runs[0].test.probs[:, EDEMA]) == 0.0
    assert zero.get_y() + zero.get_height() == pytest.approx(0.0)
    assert zero.get_height() > 0.02 * (1 - bottom), "an AUROC of 0 is a visible bar"
    hatched = [p for p in ax.patches if p.get_hatch()]
    assert sorted(round(centre(p)) for p in hatched) == [FRACTURE, FRACTURE], "one hatched stub per run"
    assert all(p.get_facecolor()[:3] == (1.0, 1.0, 1.0) for p in hatched)
    na = [t for t in ax.texts if t.get_text() == "n/a"]
    assert sorted(round(t.get_position()[0]) for t in na) == [FRACTURE, FRACTURE]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[:2] == ["all stage2 s0", "vision stage2 s0"]
    assert any(t.startswith("n/a: AUROC undefined") for t in legend)


def test_calibration_shows_cases_per_bin_and_greys_small_bins(drawn, tmp_path):
    runs = [
        result("a/all_s0/stage2", ["vision", "text", "clinical"], 0, *data(3)),
        result("a/vision_s0/stage2", ["vision"], 0, *data(4)),
    ]
    figures.calibration(runs, tmp_path, bins=10, min_cases=10)
    fig = drawn["calibration.png"]
    assert "fewer than 10 cases" in fig.get_suptitle() and "marker area" in fig.get_suptitle()
    pairs = []  # (cases, marker area) over every panel and run: one scale for the whole figure
    small_bins = 0
    for j in (0, 2, EDEMA, 12):
        ax = fig.axes[j]
        hollow = [c for c in ax.collections if len(c.get_facecolors()) == 0]
        hollow_points = np.concatenate([c.get_offsets() for c in hollow]) if hollow else np.empty((0, 2))
        hollow_sizes = np.concatenate([c.get_sizes() for c in hollow]) if hollow else np.empty(0)
        expected_hollow = []
        for k, r in enumerate(runs):
            y, p = r.test.targets[:, j], r.test.probs[:, j]
            observed, predicted = calibration_curve(y, p, n_bins=10, strategy="uniform")
            cases = np.histogram(p, bins=10, range=(0, 1))[0]
            cases = cases[cases > 0]
            enough = cases >= 10
            colour = to_rgba(f"C{k}")
            filled = [
                c
                for c in ax.collections
                if len(c.get_facecolors()) and np.allclose(c.get_facecolors()[0][:3], colour[:3])
            ]
            assert len(filled) == 1
            np.testing.assert_allclose(filled[0].get_offsets(), np.c_[predicted, observed][enough], atol=1e-6)
            pairs += list(zip(cases[enough], filled[0].get_sizes()))
            line = [curve for curve in ax.lines if np.allclose(to_rgba(curve.get_color())[:3], colour[:3])]
            assert len(line) == 1, "one curve per run"
            np.testing.assert_allclose(
                line[0].get_xydata(),
                np.c_[predicted, observed][enough],
                atol=1e-6,
                err_msg="the curve joins the bins with enough cases only",
            )
            expected_hollow += [(x, o, n) for x, o, n in zip(predicted[~enough], observed[~enough], cases[~enough])]
        small_bins += len(expected_hollow)
        order = np.lexsort(hollow_points.T[::-1])
        got = sorted(expected_hollow)
        np.testing.assert_allclose(hollow_points[order], np.array([g[:2] for g in got]).reshape(-1, 2), atol=1e-6)
        pairs += list(zip([g[2] for g in got], hollow_sizes[order]))
    assert small_bins > 0, "the data has bins below the minimum"
    cases, areas = np.array(pairs, dtype=float).T
    slope, intercept = np.polyfit(cases, areas, 1)
    assert slope > 0 and np.allclose(areas, slope * cases + intercept, atol=1e-6), (
        "marker area grows linearly with the cases"
    )
    assert intercept < 0.05 * slope * cases.max(), "and is nearly proportional to them"
    key = [t.get_text() for t in fig.axes[-1].get_legend().get_texts()]
    assert key[-1] == "< 10 cases (not joined)" and all(t.endswith(" cases") for t in key[:-1])


def test_short_labels_tell_runs_apart():
    def run(name, modalities, seed, stage="stage2"):
        return Run(name=name, directory=Path(name), stage=stage, modalities=modalities, config={}, seed=seed)

    everything = ["vision", "text", "clinical"]
    runs = [
        run("sweeps/random-all-two_stage/3_a1b2c3d4/stage2", everything, 0),
        run("sweeps/random-all-two_stage/5_ffee0011/stage2", everything, 0),
        run("sweeps/random-all-two_stage/3_a1b2c3d4/stage1", everything, 0, "stage1"),
        run("baselines/vision/stage2", ["vision"], 0),
        run("x/b/stage2", ["vision"], 1),
        run("b/stage2", ["vision"], 1),
        run("sweeps/random-vt/2_abc/stage2", ["vision", "text"], 7),
    ]
    assert figures.short_labels(runs) == {
        "sweeps/random-all-two_stage/3_a1b2c3d4/stage2": "all stage2 s0 (3_a1b2c3d4)",
        "sweeps/random-all-two_stage/5_ffee0011/stage2": "all stage2 s0 (5_ffee0011)",
        "sweeps/random-all-two_stage/3_a1b2c3d4/stage1": "all stage1 s0",
        "baselines/vision/stage2": "vision stage2 s0",
        "x/b/stage2": "vision stage2 s1 (x/b)",
        "b/stage2": "vision stage2 s1 (b)",
        "sweeps/random-vt/2_abc/stage2": "vision_text stage2 s7",
    }


def test_curve_legends_use_short_labels_and_one_colour_per_run(drawn, tmp_path):
    first, second = data(5), data(6)
    first[1][:, EDEMA] = 0  # the first run has no Edema positive: its panel shows the second run only
    runs = [
        result("sweeps/random-all-two_stage/3_a1b2c3d4/stage2", ["vision", "text", "clinical"], 0, *first),
        result("sweeps/random-all-two_stage/5_ffee0011/stage2", ["vision", "text", "clinical"], 0, *second),
    ]
    figures.curves(runs, tmp_path)
    fig = drawn["roc_curves.png"]
    legend = fig.axes[-2].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["all stage2 s0 (3_a1b2c3d4)", "all stage2 s0 (5_ffee0011)"]
    colours = [to_rgba(h.get_color()) for h in legend.legend_handles]
    edema = [curve for curve in fig.axes[EDEMA].lines if curve.get_linestyle() != ":"]
    assert len(edema) == 1 and to_rgba(edema[0].get_color()) == colours[1], (
        "the second run's curve in its legend colour"
    )
    y, p = runs[1].test.targets[:, EDEMA], runs[1].test.probs[:, EDEMA]
    fpr, tpr = edema[0].get_xydata().T
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc_score(y, p), abs=1e-6)
