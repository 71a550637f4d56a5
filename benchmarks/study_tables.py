"""Markdown matrices of the digits companion study (benchmarks/digits_companion_study.sh).

Reads ``<runs>/<model>/<study>/sweep.csv`` (written by ``--mode=sweep``) and prints, per
study, one row per preset and one column per step count (or CFG scale): "FD / accuracy", plus
the NFE of each cell when the presets spend different NFE at equal steps.

    python benchmarks/study_tables.py runs
"""
from __future__ import annotations

import csv
import os
import sys


def read_rows(path: str) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def matrix(rows: list[dict], column: str) -> str:
    """Presets x ``column`` values; cells "FD / acc" (+ " @NFE" when NFE != steps)."""
    presets = list(dict.fromkeys(r.get("preset", "") or "default" for r in rows))
    cols = list(dict.fromkeys(r[column] for r in rows))
    head = f"| preset \\ {column} | " + " | ".join(cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    for p in presets:
        cells = []
        for c in cols:
            hit = [r for r in rows if (r.get("preset", "") or "default") == p and r[column] == c]
            if not hit:
                cells.append("")
                continue
            r = hit[0]
            cell = f"{float(r['fd']):.3f} / {float(r['class_accuracy']):.3f}"
            if int(r["nfe"]) != int(r["num_iter"]):
                cell += f" @{r['nfe']}"
            cells.append(cell)
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(runs: str) -> None:
    for model in sorted(os.listdir(runs)):
        mdir = os.path.join(runs, model)
        if not os.path.isdir(mdir):
            continue
        for study in sorted(os.listdir(mdir)):
            path = os.path.join(mdir, study, "sweep.csv")
            if not study.startswith("study") or not os.path.exists(path):
                continue
            rows = read_rows(path)
            column = "num_iter" if len({r["num_iter"] for r in rows}) > 1 else "cfg_scale"
            print(f"\n### {model} / {study} (cells: FD / class accuracy)\n")
            print(matrix(rows, column))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs")
