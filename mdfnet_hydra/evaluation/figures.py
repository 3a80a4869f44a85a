"""Figures readable without zooming: ROC and PR curves per label, per-label AUROC with CIs,
confusion matrices at the validation-chosen thresholds, and calibration curves."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mdfnet_hydra.evaluation.analysis import RunResult  # noqa: E402
from mdfnet_hydra.evaluation.stats import roc_points  # noqa: E402
from mdfnet_hydra.labels import CHEXPERT_LABELS  # noqa: E402

plt.rcParams.update({"font.size": 11, "axes.titlesize": 12, "legend.fontsize": 10})
DPI = 100


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")


def _label_grid(title: str):
    fig, axes = plt.subplots(4, 4, figsize=(17, 16))
    fig.suptitle(title, fontsize=15)
    return fig, axes.ravel()


def _valid(result: RunResult, j: int) -> tuple[np.ndarray, np.ndarray]:
    valid = result.test.mask[:, j] > 0
    return result.test.targets[valid, j] > 0.5, result.test.probs[valid, j]


def curves(results: Sequence[RunResult], out: Path) -> list[Path]:
    written = []
    for kind in ("roc", "pr"):
        fig, axes = _label_grid("ROC curves (test)" if kind == "roc" else "Precision-recall curves (test)")
        for j, name in enumerate(CHEXPERT_LABELS):
            ax = axes[j]
            for result in results:
                y, p = _valid(result, j)
                if not (0 < y.sum() < len(y)):
                    continue
                _, fpr, tpr, precision = roc_points(y, p)
                if kind == "roc":
                    auc = result.auroc[name][0]
                    ax.plot(np.r_[0, fpr], np.r_[0, tpr], label=f"{auc:.3f}")
                else:
                    ax.plot(np.r_[0, tpr], np.r_[1, precision], label=f"{result.auprc[name]:.3f}")
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
                ax.legend(title="AUROC" if kind == "roc" else "AUPRC", loc="lower right" if kind == "roc" else "upper right")
            else:
                ax.text(0.5, 0.5, "undefined\n(one class only)", ha="center", va="center", transform=ax.transAxes)
        _legend_panel(axes, results)
        written.append(_save(fig, out / f"{kind}_curves.png"))
    return written


def _legend_panel(axes, results: Sequence[RunResult]) -> None:
    for ax in axes[len(CHEXPERT_LABELS):]:
        ax.axis("off")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    handles = [plt.Line2D([0], [0], color=colours[k % len(colours)], linewidth=3) for k in range(len(results))]
    axes[-2].legend(handles, [r.run.label for r in results], loc="center", title="runs", fontsize=11)


def auroc_bars(results: Sequence[RunResult], out: Path) -> Path:
    names = list(CHEXPERT_LABELS) + ["mean"]
    fig, ax = plt.subplots(figsize=(19, 7.5))
    width = 0.8 / max(len(results), 1)
    x = np.arange(len(names))
    lowest = 0.4
    for k, result in enumerate(results):
        values, low, high = [], [], []
        for name in CHEXPERT_LABELS:
            auc = result.auroc[name]
            values.append(np.nan if auc is None else auc[0])
            low.append(0 if auc is None else auc[0] - auc[1])
            high.append(0 if auc is None else auc[2] - auc[0])
        mean = np.nan if result.mean_auroc is None else result.mean_auroc
        values.append(mean)
        low.append(0 if np.isnan(result.mean_ci[0]) else mean - result.mean_ci[0])
        high.append(0 if np.isnan(result.mean_ci[1]) else result.mean_ci[1] - mean)
        lowest = min([lowest] + [v - l for v, l in zip(values, low) if v == v])
        ax.bar(x + (k - (len(results) - 1) / 2) * width, values, width, yerr=[low, high], capsize=2, label=result.run.label)
    ax.set_xticks(x, [n.replace(" ", "\n", 1) for n in names], fontsize=10)
    ax.set_ylabel("test AUROC (95% CI)")
    ax.set_ylim(max(0.0, lowest - 0.02), 1.0)
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_title("Per-label test AUROC by configuration (DeLong CI per label, patient bootstrap CI for the mean)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=min(4, max(1, len(results))), frameon=False)
    return _save(fig, out / "auroc_by_label.png")


def confusion_matrices(result: RunResult, rule: str, out: Path) -> Path:
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
            ax.text(c, r, str(v), ha="center", va="center", fontsize=13,
                    color="white" if v > matrix.max() / 2 else "black")
        ax.set_xticks([0, 1], ["pred -", "pred +"])
        ax.set_yticks([0, 1], ["true -", "true +"])
        ax.set_title(f"{name}\nthreshold {result.thresholds[j]:.2f}")
    for ax in axes[len(CHEXPERT_LABELS):]:
        ax.axis("off")
    return _save(fig, out / "confusion" / f"{slug(result.run.name)}.png")


def calibration(results: Sequence[RunResult], out: Path, bins: int = 10) -> Path:
    fig, axes = _label_grid("Calibration (test): observed frequency against predicted probability, 10 bins")
    edges = np.linspace(0, 1, bins + 1)
    for j, name in enumerate(CHEXPERT_LABELS):
        ax = axes[j]
        for result in results:
            y, p = _valid(result, j)
            if len(y) == 0:
                continue
            which = np.clip(np.digitize(p, edges) - 1, 0, bins - 1)
            used = [b for b in range(bins) if (which == b).any()]
            ax.plot([p[which == b].mean() for b in used], [y[which == b].mean() for b in used], marker="o", markersize=3)
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(name)
        ax.set_xlabel("predicted")
        ax.set_ylabel("observed")
    _legend_panel(axes, results)
    return _save(fig, out / "calibration.png")


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
