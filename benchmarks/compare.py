"""Compare two sets of ``python -m batchnorm bench --json`` runs cell by cell: new against old.

Run: ``python benchmarks/compare.py old1.json old2.json ... -- new1.json new2.json ...``. For every
case and mode it prints the median over runs of our time and of our time over torch's measured in
the same process (which cancels much of the machine's drift between runs), and new / old of both.
Case E has no torch column: there, our time over the copy floor (``copy_``) normalizes instead.
"""

from __future__ import annotations

import json
import statistics
import sys


def _cells(paths: list[str]) -> dict[tuple[str, str], dict[str, list[float]]]:
    cells: dict[tuple[str, str], dict[str, list[float]]] = {}
    for path in paths:
        with open(path) as file:
            for row in json.load(file)["rows"]:
                cell = cells.setdefault((row["case"], row["mode"]), {"ms": [], "relative": []})
                cell["ms"].append(row["ours_ms"])
                cell["relative"].append(row["ours_over_torch"] or row["ours_over_copy"])
    return cells


def main(argv: list[str]) -> None:
    split = argv.index("--")
    old, new = _cells(argv[:split]), _cells(argv[split + 1 :])
    print(f"{'case':4} {'mode':18} {'old ms':>8} {'new ms':>8} {'new/old':>8}", end="   ")
    print(f"{'old rel':>8} {'new rel':>8} {'new/old':>8}")
    for key in old:
        if key not in new:
            continue
        o_ms, n_ms = (statistics.median(cells[key]["ms"]) for cells in (old, new))
        o_rel, n_rel = (statistics.median(cells[key]["relative"]) for cells in (old, new))
        print(f"{key[0]:4} {key[1]:18} {o_ms:8.3f} {n_ms:8.3f} {n_ms / o_ms:8.3f}", end="   ")
        print(f"{o_rel:8.3f} {n_rel:8.3f} {n_rel / o_rel:8.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
