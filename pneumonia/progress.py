"""Progress of a long loop, on stderr (stdout may carry data: predict's CSV).

On a terminal a tqdm bar; elsewhere (DVC logs, `dvc queue logs`, CI) one line each time another tenth is done,
since a redrawn bar would fill a log file with carriage returns.
"""
from __future__ import annotations

import contextlib
import sys

from tqdm import tqdm


@contextlib.contextmanager
def progress(total: int, label: str, unit: str = "images"):
    """Yields report(done): call it with how many of `total` are done so far."""
    if sys.stderr.isatty():
        with tqdm(total=total, desc=label, unit=unit, dynamic_ncols=True) as bar:
            yield lambda done: bar.update(done - bar.n)
        return
    last = 0

    def report(done: int) -> None:
        nonlocal last
        if total and done * 10 // total > last * 10 // total:
            print(f"  {label}: {done}/{total} {unit}", file=sys.stderr, flush=True)
        last = done

    yield report
