"""Render a stored audit report's HTML to a PNG with headless Chromium (docs/report.png).

    .venv/bin/python docs/screenshot.py AUDIT_KEY [--store URL] [--out docs/report.png]

AUDIT_KEY is what `unlearning-audit report` takes: report/<digest> or a unique digest prefix
(`unlearning-audit ls --stage report` lists them). Needs Debian's `chromium` package; Chromium
runs with a fresh profile and every background network feature off, and the report itself loads
nothing from the network.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

from unlearning_audit.report import REPORT_HTML, find_report
from unlearning_audit.store import Store

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


def render_png(
    html: Path | str, png: Path, width: int = 1400, height: int = 6000, budget_ms: int = 0
) -> None:
    """Screenshot ``html`` (a local file, or a URL) into ``png`` at ``width`` x ``height`` CSS
    pixels; ``budget_ms`` of virtual time first lets a single-page app load and render."""
    chromium = shutil.which("chromium")
    if chromium is None:
        raise RuntimeError("chromium is not installed (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="ua-chromium-") as profile:
        subprocess.run(
            [
                chromium,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={profile}",
                f"--screenshot={png.resolve()}",
                f"--window-size={width},{height}",
                *([f"--virtual-time-budget={budget_ms}"] if budget_ms else []),
                html.resolve().as_uri() if isinstance(html, Path) else html,
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("key", metavar="AUDIT_KEY", help="report/<digest>, or a digest prefix")
    parser.add_argument("--store", help="artifact store URL (default ./audit-store)")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("report.png"))
    parser.add_argument("--width", type=int, default=1230, help="CSS pixels (default 1230)")
    parser.add_argument("--height", type=int, default=1790, help="CSS pixels (default 1790)")
    args = parser.parse_args()
    store = Store(args.store)
    html = store.local_dir(find_report(store, args.key)) / REPORT_HTML
    render_png(html, args.out, args.width, args.height)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
