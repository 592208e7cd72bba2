"""What the benchmarks share: the machine they ran on, timing, and how results are written."""

import json
import platform
import statistics
import time
from pathlib import Path

import torch


def machine() -> dict[str, str]:
    """Where a figure was measured, for the header of its table."""
    return {
        "machine": f"{torch.get_num_threads()} CPU threads ({platform.machine()})",
        "torch": torch.__version__,
    }


def median_seconds(call, repeats: int) -> float:
    """Median wall time of `call()` over `repeats` calls, after one warm-up call (allocation
    and first-call costs)."""
    call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def write_results(out: str, header: dict, rows: list[dict], table: str) -> None:
    """`out`.json (header and rows) and `out`.md (the table), then the table on stdout."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps({**header, "rows": rows}, indent=2))
    path.with_suffix(".md").write_text(table)
    print(table)
