"""Open a report's index.html in headless Chromium and save a screenshot, to see that its plots render.

    python scripts/screenshot_report.py runs/quickstart/report [--out report.png] [--width 1280 --height 2400]

Needs Debian's chromium (`apt-get install chromium`). Prints the share of coloured pixels: plots are coloured,
text and tables are black on white, so a page whose images failed to load scores near zero."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--hide-scrollbars",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def find_chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def screenshot(html: Path, out: Path, width: int = 1280, height: int = 2400, timeout: float = 120) -> Path:
    browser = find_chromium()
    if browser is None:
        raise FileNotFoundError("no chromium found: `apt-get install chromium` (Debian) or put it on PATH")
    with tempfile.TemporaryDirectory(prefix="align-chromium-") as profile:
        cmd = [browser, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
               f"--screenshot={out.resolve()}", html.resolve().as_uri()]
        subprocess.run(cmd, check=True, capture_output=True, timeout=timeout)
    if not out.is_file():
        raise RuntimeError(f"chromium wrote no screenshot to {out}")
    return out


def coloured_share(png: Path) -> float:
    """Fraction of pixels whose colour is clearly not grey (R, G, B differ by more than 40 of 255)."""
    import matplotlib.image as mpimg

    pixels = mpimg.imread(str(png))[..., :3]
    spread = pixels.max(axis=-1) - pixels.min(axis=-1)
    return float((spread > 40 / 255).mean())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", help="report directory (holding index.html) or the HTML file itself")
    parser.add_argument("--out", help="PNG to write (default: REPORT/screenshot.png)")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=2400)
    args = parser.parse_args(argv)
    html = Path(args.report)
    html = html / "index.html" if html.is_dir() else html
    if not html.is_file():
        print(f"{html}: no such file", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else html.parent / "screenshot.png"
    screenshot(html, out, args.width, args.height)
    print(f"{out}: {100 * coloured_share(out):.1f}% coloured pixels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
