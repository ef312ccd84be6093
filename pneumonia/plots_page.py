"""The `dvc plots show` page with vega, vega-lite and vega-embed served locally: it opens with no network.

    python -m pneumonia.plots_page [OUT_DIR]    (default dvc_plots; `make plots`)

Writes OUT_DIR/index.html from plots_page/template.html, and copies plots_page/vendor/ to OUT_DIR/vendor/,
where the page's <script src="vendor/..."> tags find them. Run it in the project root after `dvc repro`.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from pneumonia.errors import PipelineError

PAGE_DIR = Path(__file__).resolve().parents[1] / "plots_page"
TEMPLATE = PAGE_DIR / "template.html"
VENDOR = PAGE_DIR / "vendor"
REMOTE_SCRIPT = re.compile(r"<script[^>]*\ssrc\s*=\s*[\"']?(?:https?:)?//", re.IGNORECASE)
VEGA_PLOT = re.compile(r"var spec = \{")  # dvc_render's VegaRenderer.DIV; "var spec = {};" when a plot has no data
EMPTY_PLOT = re.compile(r"var spec = \{\};\s*vegaEmbed\('#([^']+)'")


def empty_plots(html: str) -> list[str]:
    """Ids of the vega plots on the page that have no data (their files are missing)."""
    return EMPTY_PLOT.findall(html)


def build(out_dir: str | Path = "dvc_plots") -> Path:
    """Write the page and its scripts under out_dir; return the page's path."""
    out_dir = Path(out_dir)
    page = out_dir / "index.html"
    page.unlink(missing_ok=True)  # dvc writes no page when it finds no plots; never leave a stale one
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "plots", "show", "--html-template", str(TEMPLATE), "-o", str(out_dir)],
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines() or ["no output"]
        raise PipelineError(f"dvc plots show failed: {lines[-1]}")
    html = page.read_text(encoding="utf8") if page.exists() else ""
    if len(empty_plots(html)) == len(VEGA_PLOT.findall(html)) and "<img" not in html:
        raise PipelineError("no plot data found; run `dvc repro` (make run) first")
    if REMOTE_SCRIPT.search(html):
        raise PipelineError(f"{page} loads a script from the network; check {TEMPLATE}")
    shutil.copytree(VENDOR, out_dir / "vendor", dirs_exist_ok=True)
    return page


def main(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__.strip())
        return 0
    if len(argv) > 1 or (argv and argv[0].startswith("-")):
        print("usage: python -m pneumonia.plots_page [OUT_DIR]", file=sys.stderr)
        return 2
    try:
        page = build(*argv)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    empty = empty_plots(page.read_text(encoding="utf8"))
    if empty:
        print(f"warning: no data yet for {', '.join(empty)}", file=sys.stderr)
    print(f"plots page: {page.resolve().as_uri()} (works offline)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
