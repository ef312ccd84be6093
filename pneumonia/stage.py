"""What every stage script shares: params loaded once, user errors printed as one line."""
from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable

from pneumonia import devicestats
from pneumonia import params as params_lib
from pneumonia.errors import PipelineError


def _terminate(signum, frame):
    # Turn SIGTERM (a preempted job, `kill`) into an exception so temporary files are cleaned up.
    raise KeyboardInterrupt


def run(name: str, main: Callable[[params_lib.StageParams], None]) -> None:
    """Run a stage's main with the params it lists in dvc.yaml, and only those."""
    start = time.perf_counter()
    signal.signal(signal.SIGTERM, _terminate)
    try:
        main(params_lib.for_stage(params_lib.load(), name))
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"error: {name} interrupted; no partial output was kept, rerun with dvc repro (training resumes "
              "from the last finished epoch)", file=sys.stderr)
        sys.exit(130)
    wall = time.perf_counter() - start
    print(f"{name}: done in {wall:.1f} s", flush=True)
    if devicestats.enabled():  # make gpu-check
        devicestats.append({"stage": name, "wall_s": round(wall, 2),
                            "peak_device_memory_bytes": devicestats.peak_memory_bytes()})
