"""Does fusion pay? Train the full model and each single modality with identical settings and
compare validation / test mean AUROC.

    python -m mdfnet_hydra.benchmarks.modality_gap [--seeds 0 1] [--out DIR] [hydra overrides ...]

Runs one Hydra multirun (`modality=all,vision,text,clinical` x seeds) through the real entry
point, then prints a table and exits 1 if the full model does not beat every single modality on
validation mean AUROC (averaged over seeds).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from statistics import mean

from mdfnet_hydra.config import modality_label

MODALITIES = ("all", "vision", "text", "clinical")


def collect(sweep_dir: Path) -> dict[str, dict[str, list[float]]]:
    """modality -> {"val": [...], "test": [...]} over the jobs of a sweep directory."""
    scores: dict[str, dict[str, list[float]]] = defaultdict(lambda: {"val": [], "test": []})
    for summary in sorted(sweep_dir.glob("*/metrics.json")):
        data = json.loads(summary.read_text())
        final = data["stages"][data["final_stage"]]
        modality = modality_label(final["modalities"])
        scores[modality]["val"].append(final["val"]["auroc_mean"])
        scores[modality]["test"].append(final["test"]["auroc_mean"] if final.get("test") else float("nan"))
    return scores


def report(scores: dict[str, dict[str, list[float]]]) -> tuple[str, bool]:
    full_val = mean(scores["all"]["val"])
    lines = [
        f"{'modality':<10} {'val AUROC':>10} {'test AUROC':>10} {'val gap to all':>15}  (mean over {len(scores['all']['val'])} seed(s))"
    ]
    ok = True
    for m in MODALITIES:
        val, test = mean(scores[m]["val"]), mean(scores[m]["test"])
        gap = full_val - val
        lines.append(f"{m:<10} {val:>10.4f} {test:>10.4f} {gap:>+15.4f}")
        if m != "all" and gap <= 0:
            ok = False
    lines.append("full model beats every single modality: " + ("yes" if ok else "NO"))
    return "\n".join(lines), ok


def parse_arguments(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """The benchmark's own options and the Hydra overrides passed on to every job."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument(
        "--out", type=Path, default=None, help="sweep directory (default: outputs/benchmarks/modality_gap-<time>)"
    )
    return parser.parse_known_args(argv)


def sweep_command(args: argparse.Namespace, overrides: list[str], out: Path) -> list[str]:
    """The one multirun that trains every modality with every seed."""
    return [
        sys.executable,
        "-m",
        "mdfnet_hydra.train",
        "--multirun",
        f"modality={','.join(MODALITIES)}",
        f"seed={','.join(map(str, args.seeds))}",
        f"hydra.sweep.dir={out}",
        *overrides,
    ]


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_arguments(argv)
    out = args.out or Path("outputs/benchmarks") / time.strftime("modality_gap-%Y%m%d-%H%M%S")
    command = sweep_command(args, overrides, out)
    print("running:", " ".join(command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True)
    table, ok = report(collect(out))
    print(f"\n{table}\nwall time {time.perf_counter() - started:.0f}s, runs in {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
