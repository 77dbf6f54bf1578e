"""A markdown table from Nsight Compute's ``--csv --page details`` output of ``benchmarks/ncu_rows.py``:
one column per profiled launch (in launch order, named from the script's ``launch order:`` line),
rows for cycles, instructions, pipe use, issue and the largest stall reasons. Issue 13.

    python3 benchmarks/ncu_summary.py ncu_split.csv
"""
import csv
import sys

ROWS = [  # (label, metric name, scale)
    ("elapsed cycles (M)", "Elapsed Cycles", 1e-6),
    ("instructions executed (G)", "Executed Instructions", 1e-9),
    ("tensor pipe active %", "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active", 1),
    ("MUFU (XU) pipe %", "sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active", 1),
    ("FMA pipe %", "sm__inst_executed_pipe_fma.avg.pct_of_peak_sustained_active", 1),
    ("ALU pipe %", "sm__inst_executed_pipe_alu.avg.pct_of_peak_sustained_active", 1),
    ("issue slots busy %", "Issue Slots Busy", 1),
    ("warps per scheduler", "Active Warps Per Scheduler", 1),
    ("warp cycles per issued instruction", "Warp Cycles Per Issued Instruction", 1),
]
STALL = "smsp__average_warps_issue_stalled_"


def main(path: str):
    lines = open(path, errors="replace").read().splitlines()
    order = next((ln.split(":", 1)[1].strip().split(", ") for ln in lines if ln.startswith("launch order:")), [])
    start = next(i for i, ln in enumerate(lines) if ln.startswith('"ID"'))
    vals: dict = {}                                   # launch id -> metric name -> value
    for r in csv.DictReader(lines[start:]):
        try:
            vals.setdefault(int(r["ID"]), {})[r["Metric Name"]] = float(r["Metric Value"].replace(",", ""))
        except (ValueError, KeyError, AttributeError):
            continue
    ids = sorted(vals)
    # the profiled launches are the script's variants in order (its --launch-count)
    names = order[-len(ids):] if len(order) >= len(ids) else [f"launch {i}" for i in ids]
    print("| | " + " | ".join(names) + " |")
    print("|---" * (len(ids) + 1) + "|")
    for label, key, scale in ROWS:
        print(f"| {label} | " + " | ".join(f"{vals[i][key] * scale:.2f}" if key in vals[i] else "-" for i in ids) + " |")
    cells = []
    for i in ids:
        st = sorted(((v, k[len(STALL):].replace("_per_issue_active.ratio", "")) for k, v in vals[i].items()
                     if k.startswith(STALL) and "selected" not in k), reverse=True)[:4]
        cells.append(", ".join(f"{n} {v:.2f}" for v, n in st) or "-")
    print("| top stalls (cycles per instruction) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
