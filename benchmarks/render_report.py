"""Screenshot a ``sink-prune inspect`` report.html with headless Chromium (for docs, and the render test).

The page is self-contained (PNGs embedded as base64), so Chromium needs no network; every flag below keeps it
from trying anyway. Install it on Debian with ``apt-get install -y chromium``.

    sink-prune inspect MODEL --compare AR_MODEL --output sinks
    python benchmarks/render_report.py sinks/report.html --output docs/images/report.png --height 2400
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["find_chromium", "screenshot"]

_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
)


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if found := shutil.which(name):
            return found
    return None


def screenshot(
    html: str | Path, png: str | Path, *, width: int = 1200, height: int = 900, browser: str | None = None,
    timeout: float = 120.0,
) -> Path:
    """Render ``html`` at ``width`` x ``height`` CSS pixels into ``png``; raises if Chromium wrote nothing."""
    browser = browser or find_chromium()
    if browser is None:
        raise FileNotFoundError("chromium not found; on Debian: apt-get install -y chromium")
    html, png = Path(html).resolve(), Path(png).resolve()
    if not html.is_file():
        raise FileNotFoundError(html)
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        result = subprocess.run(
            [browser, *_FLAGS, f"--user-data-dir={profile}", f"--screenshot={png}",
             f"--window-size={width},{height}", html.as_uri()],
            capture_output=True, text=True, timeout=timeout,
        )
    if not png.is_file() or png.stat().st_size == 0:
        raise RuntimeError(f"chromium wrote no screenshot (exit {result.returncode}):\n{result.stderr[-2000:]}")
    return png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("html", type=Path, help="report.html written by sink-prune inspect")
    parser.add_argument("--output", "-o", type=Path, help="PNG to write (default: next to the page)")
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=900, help="window height; large values capture more")
    args = parser.parse_args(argv)
    output = args.output or args.html.with_name(args.html.stem + "_screenshot.png")
    print(screenshot(args.html, output, width=args.width, height=args.height))
    return 0


if __name__ == "__main__":
    sys.exit(main())
