"""Figures readable without zooming: ROC and PR curves per label, per-label AUROC with CIs,
confusion matrices at the validation-chosen thresholds, and calibration curves.

Legends name runs by short labels (`short_labels`: `<modality> <stage> s<seed>`, with the end of the
run's path where runs share those); results.md lists which run each label stands for. An undefined
AUROC (test cases of one class only) is a hatched "n/a" stub, never a bar of height 0, and an AUROC of
0 is a bar like any other. Calibration markers have an area proportional to the cases in their bin;
bins with fewer than `MIN_BIN_CASES` cases are hollow grey markers, not joined by the curve."""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from mdfnet_hydra.evaluation.analysis import RunResult  # noqa: E402
from mdfnet_hydra.evaluation.runs import Run  # noqa: E402
from mdfnet_hydra.evaluation.stats import roc_points  # noqa: E402
from mdfnet_hydra.labels import CHEXPERT_LABELS  # noqa: E402

plt.rcParams.update({"font.size": 11, "axes.titlesize": 12, "legend.fontsize": 10})
DPI = 100
MIN_BIN_CASES = 10  # calibration bins with fewer cases are greyed out and not joined by the curve


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")


def file_names(names: Sequence[str]) -> dict[str, str]:
    """Run name -> a file name of its own: its slug, with a short hash of the name where runs' slugs
    would be the same (`seed=1/stage2` and `seed_1/stage2`, common in sweeps' directory names), so
    one run's figure never replaces another's."""
    slugs = {name: slug(name) for name in names}
    shared = Counter(slugs.values())
    return {
        name: s if shared[s] == 1 else f"{s}-{hashlib.sha1(name.encode()).hexdigest()[:8]}" for name, s in slugs.items()
    }


def short_labels(runs: Sequence[Run]) -> dict[str, str]:
    """Run name -> legend label: `<modality> <stage> s<seed>`, and where several runs share that, the
    shortest end of their job path (the run's directory above the stage directory) that tells them
    apart, e.g. `all stage2 s0 (3_a1b2c3d4)` for `sweeps/random-all-two_stage/3_a1b2c3d4/stage2`
    (the whole job path where it is the end of another's). Labels are unique: a run they would not
    tell apart is shown by its full name."""
    base = {run.name: f"{run.modality} {run.stage} s{run.seed}" for run in runs}
    labels = {}
    for run in runs:
        same = [other for other in runs if base[other.name] == base[run.name] and other.name != run.name]
        if not same:
            labels[run.name] = base[run.name]
            continue
        mine = _job_parts(run)
        theirs = [_job_parts(other) for other in same]
        suffix = next(
            ("/".join(mine[-k:]) for k in range(1, len(mine) + 1) if all(other[-k:] != mine[-k:] for other in theirs)),
            "/".join(mine),
        )
        labels[run.name] = f"{base[run.name]} ({suffix})"
    counts = Counter(labels.values())
    return {name: label if counts[label] == 1 else name for name, label in labels.items()}


def _job_parts(run: Run) -> tuple[str, ...]:
    parts = Path(run.name).parts
    return parts[:-1] if len(parts) > 1 and parts[-1] == run.stage else parts


def _colour(k: int) -> str:
    """The k-th run's colour in every figure (and in its legend), whichever runs a panel leaves out."""
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return colours[k % len(colours)]


def _labels(results: Sequence[RunResult], labels: Optional[dict[str, str]]) -> list[str]:
    labels = labels if labels is not None else short_labels([r.run for r in results])
    return [labels.get(r.run.name, r.run.name) for r in results]


def _label_grid(title: str):
    fig, axes = plt.subplots(4, 4, figsize=(17, 16))
    fig.suptitle(title, fontsize=15)
    return fig, axes.ravel()


def _valid(result: RunResult, j: int) -> tuple[np.ndarray, np.ndarray]:
    valid = result.test.mask[:, j] > 0
    return result.test.targets[valid, j] > 0.5, result.test.probs[valid, j]


def curves(results: Sequence[RunResult], out: Path, labels: Optional[dict[str, str]] = None) -> list[Path]:
    written = []
    for kind in ("roc", "pr"):
        fig, axes = _label_grid("ROC curves (test)" if kind == "roc" else "Precision-recall curves (test)")
        for j, name in enumerate(CHEXPERT_LABELS):
            ax = axes[j]
            for k, result in enumerate(results):
                y, p = _valid(result, j)
                if not (0 < y.sum() < len(y)):
                    continue
                _, fpr, tpr, precision = roc_points(y, p)
                if kind == "roc":
                    auc = result.auroc[name][0]
                    ax.plot(np.r_[0, fpr], np.r_[0, tpr], color=_colour(k), label=f"{auc:.3f}")
                else:
                    ax.plot(np.r_[0, tpr], np.r_[1, precision], color=_colour(k), label=f"{result.auprc[name]:.3f}")
            if kind == "roc":
                ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
                ax.set_xlabel("false positive rate")
                ax.set_ylabel("true positive rate")
            else:
                ax.set_xlabel("recall")
                ax.set_ylabel("precision")
            ax.set_title(name)
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1.02)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(
                    title="AUROC" if kind == "roc" else "AUPRC", loc="lower right" if kind == "roc" else "upper right"
                )
            else:
                ax.text(0.5, 0.5, "undefined\n(one class only)", ha="center", va="center", transform=ax.transAxes)
        _legend_panel(axes, _labels(results, labels))
        written.append(_save(fig, out / f"{kind}_curves.png"))
    return written


def _legend_panel(axes, labels: Sequence[str]) -> None:
    for ax in axes[len(CHEXPERT_LABELS) :]:
        ax.axis("off")
    handles = [plt.Line2D([0], [0], color=_colour(k), linewidth=3) for k in range(len(labels))]
    axes[-2].legend(handles, list(labels), loc="center", title="runs (full names: results.md)", fontsize=11)


def _auroc_rows(result: RunResult) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(AUROC, CI below, CI above) per label and for the mean; NaN where undefined."""
    values, low, high = [], [], []
    for name in CHEXPERT_LABELS:
        auc = result.auroc[name]
        values.append(np.nan if auc is None else auc[0])
        low.append(0.0 if auc is None else auc[0] - auc[1])
        high.append(0.0 if auc is None else auc[2] - auc[0])
    mean = np.nan if result.mean_auroc is None else result.mean_auroc
    values.append(mean)
    low.append(0.0 if np.isnan(result.mean_ci[0]) or np.isnan(mean) else mean - result.mean_ci[0])
    high.append(0.0 if np.isnan(result.mean_ci[1]) or np.isnan(mean) else result.mean_ci[1] - mean)
    return np.array(values, dtype=float), np.array(low, dtype=float), np.array(high, dtype=float)


def auroc_bars(results: Sequence[RunResult], out: Path, labels: Optional[dict[str, str]] = None) -> Path:
    """Per-label test AUROC bars with CIs. Bars rise from the bottom of the axis, which lies below the
    lowest value, so an AUROC of 0 is a visible bar; an undefined AUROC is a short hatched "n/a" stub."""
    names = list(CHEXPERT_LABELS) + ["mean"]
    fig, ax = plt.subplots(figsize=(19, 7.5))
    width = 0.8 / max(len(results), 1)
    x = np.arange(len(names))
    rows = [_auroc_rows(result) for result in results]
    lowest = min([0.4] + [float(np.nanmin(v - low)) for v, low, _ in rows if np.isfinite(v).any()])
    bottom = lowest - 0.03
    stub = 0.08 * (1.0 - bottom)
    for k, (label, (values, low, high)) in enumerate(zip(_labels(results, labels), rows)):
        position = x + (k - (len(results) - 1) / 2) * width
        defined = np.isfinite(values)
        ax.bar(
            position[defined],
            values[defined] - bottom,
            width,
            bottom=bottom,
            color=_colour(k),
            yerr=[low[defined], high[defined]],
            capsize=2,
            label=label,
        )
        if not defined.all():
            ax.bar(
                position[~defined],
                stub,
                width,
                bottom=bottom,
                facecolor="white",
                edgecolor=_colour(k),
                hatch="///",
                linewidth=1,
                label=f"_{label} undefined",
            )
            for where in position[~defined]:
                ax.text(
                    where,
                    bottom + stub + 0.01,
                    "n/a",
                    rotation=90,
                    ha="center",
                    va="bottom",
                    fontsize=9,
                    color="dimgrey",
                )
    ax.set_xticks(x, [n.replace(" ", "\n", 1) for n in names], fontsize=10)
    ax.set_ylabel("test AUROC (95% CI)")
    ax.set_ylim(bottom, 1.0)
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_title("Per-label test AUROC by configuration (DeLong CI per label, patient bootstrap CI for the mean)")
    handles, texts = ax.get_legend_handles_labels()
    handles.append(Patch(facecolor="white", edgecolor="dimgrey", hatch="///"))
    texts.append("n/a: AUROC undefined (test cases of one class only), not 0")
    ax.legend(handles, texts, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=min(4, len(handles)), frameon=False)
    return _save(fig, out / "auroc_by_label.png")


def confusion_matrices(result: RunResult, rule: str, out: Path, file_name: Optional[str] = None) -> Path:
    """`file_name`: the run's among the runs evaluated (file_names); its slug by default."""
    fig, axes = _label_grid(f"Confusion matrices at validation-chosen thresholds ({rule}) - {result.run.label}")
    for j, name in enumerate(CHEXPERT_LABELS):
        ax = axes[j]
        counts = result.confusion[name]
        if counts is None:
            ax.axis("off")
            ax.set_title(f"{name}\n(no scored cases)")
            continue
        tn, fp, fn, tp = counts
        matrix = np.array([[tn, fp], [fn, tp]])
        ax.imshow(matrix, cmap="Blues")
        for (r, c), v in np.ndenumerate(matrix):
            ax.text(
                c, r, str(v), ha="center", va="center", fontsize=13, color="white" if v > matrix.max() / 2 else "black"
            )
        ax.set_xticks([0, 1], ["pred -", "pred +"])
        ax.set_yticks([0, 1], ["true -", "true +"])
        ax.set_title(f"{name}\nthreshold {result.thresholds[j]:.2f}")
    for ax in axes[len(CHEXPERT_LABELS) :]:
        ax.axis("off")
    return _save(fig, out / "confusion" / f"{file_name or slug(result.run.name)}.png")


def calibration_bins(y: np.ndarray, p: np.ndarray, bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean predicted probability, observed frequency, cases) of each non-empty bin of `bins` equal
    widths on [0, 1], binned as scikit-learn's calibration_curve(strategy="uniform")."""
    p = np.asarray(p, dtype=float)
    which = np.searchsorted(np.linspace(0, 1, bins + 1)[1:-1], p)
    cases = np.bincount(which, minlength=bins)
    predicted = np.bincount(which, weights=p, minlength=bins)
    observed = np.bincount(which, weights=np.asarray(y, dtype=float), minlength=bins)
    used = cases > 0
    return predicted[used] / cases[used], observed[used] / cases[used], cases[used]


def _marker_area(cases: np.ndarray, largest: int) -> np.ndarray:
    """Marker area (points^2) of a bin of `cases`: 4 plus a part proportional to the cases, one scale for all panels."""
    return 4.0 + 196.0 * np.asarray(cases, dtype=float) / max(largest, 1)


def calibration(
    results: Sequence[RunResult],
    out: Path,
    bins: int = 10,
    min_cases: int = MIN_BIN_CASES,
    labels: Optional[dict[str, str]] = None,
) -> Path:
    fig, axes = _label_grid(
        f"Calibration (test): observed frequency against mean predicted probability, {bins} equal-width bins; "
        f"marker area proportional to the cases in the bin;\nhollow grey markers: bins with fewer than {min_cases} "
        "cases, not joined by the curve"
    )
    binned = {}
    for j in range(len(CHEXPERT_LABELS)):
        for k, result in enumerate(results):
            y, p = _valid(result, j)
            if len(y):
                binned[j, k] = calibration_bins(y, p, bins)
    largest = max((int(cases.max()) for _, _, cases in binned.values()), default=1)
    for j, name in enumerate(CHEXPERT_LABELS):
        ax = axes[j]
        few = []  # (predicted, observed, cases) of every run's bins with too few cases: one grey scatter
        for k in range(len(results)):
            if (j, k) not in binned:
                continue
            predicted, observed, cases = binned[j, k]
            enough = cases >= min_cases
            ax.plot(predicted[enough], observed[enough], color=_colour(k), linewidth=1.2)
            ax.scatter(
                predicted[enough],
                observed[enough],
                s=_marker_area(cases[enough], largest),
                color=_colour(k),
                alpha=0.75,
                linewidths=0,
                zorder=3,
            )
            few += zip(predicted[~enough], observed[~enough], cases[~enough])
        if few:
            predicted, observed, cases = (np.array(column) for column in zip(*few))
            ax.scatter(
                predicted,
                observed,
                s=_marker_area(cases, largest),
                facecolors="none",
                edgecolors="darkgrey",
                linewidths=1,
                zorder=2,
            )
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(name)
        ax.set_xlabel("predicted")
        ax.set_ylabel("observed")
    _legend_panel(axes, _labels(results, labels))
    _size_key(axes[-1], largest, min_cases)
    return _save(fig, out / "calibration.png")


def _size_key(ax, largest: int, min_cases: int) -> None:
    """Marker areas for a few case counts, and the grey marker of a bin with too few cases."""
    candidates = (min_cases, _round(largest / 4), _round(largest))
    shown = sorted({n for n in candidates if min_cases <= n <= max(largest, min_cases)})
    handles = [
        plt.Line2D(
            [],
            [],
            linestyle="none",
            marker="o",
            color="dimgrey",
            alpha=0.75,
            markersize=float(np.sqrt(_marker_area(np.array([n]), largest)[0])),
        )
        for n in shown
    ]
    texts = [f"{n} cases" for n in shown]
    handles.append(
        plt.Line2D(
            [],
            [],
            linestyle="none",
            marker="o",
            markerfacecolor="none",
            markeredgecolor="darkgrey",
            markersize=float(np.sqrt(_marker_area(np.array([max(min_cases - 1, 1)]), largest)[0])),
        )
    )
    texts.append(f"< {min_cases} cases (not joined)")
    ax.legend(handles, texts, loc="center", title="cases per bin", fontsize=11, labelspacing=1.2)


def _round(n: float) -> int:
    """`n` to one significant digit (at least 1)."""
    if n < 1:
        return 1
    digits = 10 ** int(np.floor(np.log10(n)))
    return int(round(n / digits) * digits)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
