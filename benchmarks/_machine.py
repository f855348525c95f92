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
