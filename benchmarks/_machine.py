"""Machine description stored with every benchmark result."""
from __future__ import annotations

import datetime
import os
import platform


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = round(int(line.split()[1]) / 2 ** 20, 1)
    except OSError:
        pass
    import h5py
    import numpy
    return {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "cpu": cpu, "cores": os.cpu_count(), "mem_gib": mem, "python": platform.python_version(),
            "numpy": numpy.__version__, "h5py": h5py.__version__, "host": platform.node(),
            # other jobs on a shared machine slow every number down: record how busy it was
            "load_average_1_5_15min": [round(v, 2) for v in os.getloadavg()]}


def git_commit() -> str:
    """HEAD of the checkout the benchmark ran from, marked when tracked files had uncommitted changes."""
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                           capture_output=True, text=True).stdout.strip()
    return res.stdout.strip() + ("+uncommitted changes" if dirty else "")


def save(res: dict, stem: str, title: str, method: str, table: list[str]) -> None:
    """Write benchmarks/results/<stem>.json and .md; the .md opens with the machine and how busy it was."""
    import json
    from pathlib import Path

    res["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1) + "\n")
    m = res["machine"]
    head = (f"Machine: {m['cpu']}, {m['cores']} cores, {m['mem_gib']} GiB; {m['date_utc']} UTC; load average "
            f"{m['load_average_1_5_15min']} at the start, {res['load_average_end']} at the end (1/5/15 min; a "
            "shared machine: other jobs were running, so treat the numbers as lower bounds). ")
    (out / f"{stem}.md").write_text("\n".join([f"# {title}", "", head + method, "", *table, ""]))
