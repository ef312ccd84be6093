"""What every stage script shares: params loaded once, user errors printed as one line."""
from __future__ import annotations

import sys
import time
from collections.abc import Callable

from pneumonia import params as params_lib
from pneumonia.errors import PipelineError


def run(name: str, main: Callable[[params_lib.Params], None]) -> None:
    start = time.perf_counter()
    try:
        main(params_lib.load())
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"error: {name} interrupted; nothing was written, rerun with dvc repro", file=sys.stderr)
        sys.exit(130)
    print(f"{name}: done in {time.perf_counter() - start:.1f} s", flush=True)
