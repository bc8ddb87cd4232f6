"""The HTML report in a real browser: Debian's headless Chromium loads it
(offline, from the file), and we get the page its scripts made, what its
console said and, if asked, a screenshot.

    /usr/bin/python3 -m devtools.browser report.html [--screenshot report.png]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from html.parser import HTMLParser

CHROMIUM = "chromium"
#: the virtual time budget lets the page's asynchronous work (decompressing
#: plotly.js, drawing) finish before the DOM is dumped or the screenshot taken
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--hide-scrollbars",
    "--virtual-time-budget=60000",
]
#: a page that has not rendered by then is reported as hanging
TIMEOUT_SECONDS = 300
#: Chromium's console lines on stderr with --enable-logging=stderr
CONSOLE_LINE = re.compile(r":CONSOLE(?::|\()\d+\)?\] (.*)")


class _Plots(HTMLParser):
    """Ids of the elements plotly drew a graph in, and its SVG layers."""

    def __init__(self):
        super().__init__()
        self.plotted, self.n_svg = [], 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        if "js-plotly-plot" in classes:
            self.plotted.append(attrs.get("id"))
        if tag == "svg" and "main-svg" in classes:
            self.n_svg += 1


@dataclass
class Rendered:
    """The page after its scripts ran, and the console messages."""

    dom: str
    console: list = field(default_factory=list)

    @property
    def errors(self) -> list:
        return [m for m in self.console if "Uncaught" in m or "Error" in m]

    def plots(self) -> tuple:
        """(ids of the elements holding a plotly graph, number of plotly SVGs)."""
        parser = _Plots()
        parser.feed(self.dom)
        return parser.plotted, parser.n_svg


def chromium() -> str | None:
    return shutil.which(CHROMIUM)


def _chromium(args: list) -> subprocess.CompletedProcess:
    return subprocess.run(
        [chromium(), *FLAGS, *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_SECONDS,
    )


def render(
    path: str, screenshot: str | None = None, window: str = "1280,2000"
) -> Rendered:
    """Load ``path`` in headless Chromium; with ``screenshot`` also save a PNG
    of the top ``window`` (width,height) of the page."""
    url = "file://" + os.path.abspath(path)
    result = _chromium(["--enable-logging=stderr", "--v=0", "--dump-dom", url])
    if result.returncode:
        raise RuntimeError(f"{CHROMIUM} failed on {path}:\n{result.stderr[-2000:]}")
    console = [
        m.group(1) for m in map(CONSOLE_LINE.search, result.stderr.splitlines()) if m
    ]
    if screenshot:
        shot = _chromium([f"--screenshot={screenshot}", f"--window-size={window}", url])
        if shot.returncode:
            raise RuntimeError(
                f"{CHROMIUM} could not take a screenshot of {path}:\n{shot.stderr[-2000:]}"
            )
    return Rendered(result.stdout, console)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report")
    parser.add_argument("--screenshot", help="PNG of the top of the page")
    parser.add_argument(
        "--window", default="1280,2000", help="width,height of the screenshot"
    )
    args = parser.parse_args(argv)
    if not chromium():
        print(
            f"{CHROMIUM} is not installed (apt-get install chromium)", file=sys.stderr
        )
        return 2
    page = render(args.report, args.screenshot, args.window)
    plotted, n_svg = page.plots()
    print(f"{args.report}: {len(plotted)} plotly graphs drawn ({n_svg} SVG layers)")
    for message in page.errors:
        print(f"JavaScript error: {message}", file=sys.stderr)
    if args.screenshot:
        print(f"Screenshot: {args.screenshot}")
    return 1 if page.errors or not plotted else 0


if __name__ == "__main__":
    sys.exit(main())
