"""The HTML report of dials.correct_truncation: what it tells first (per
shell: how much was truncated, the mean pixel value before and after; what
was left alone and why), that it is self-contained, and that a real browser
draws its graphs without a JavaScript error."""

from __future__ import annotations

import base64
import glob
import gzip
import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest
from helpers import run
from test_command import ARGS, PARAMS, SHAPE, make_smv_sweep

from dxtbx.model.experiment_list import ExperimentListFactory

from devtools import browser
from dials_truncfix.core.correction import BLANK
from dials_truncfix.corrector import corrector_for
from dials_truncfix.program.report import plotly_js
from dials_truncfix.program.tasks import shell_geometry_of
from dials_truncfix.settings import Settings

DAMAGED_ROWS = slice(100, 105)


def _set_pixels(path, change):
    """Rewrite the pixels of an SMV file of SHAPE in place."""
    with open(path, "rb") as fh:
        raw = fh.read()
    n = SHAPE[0] * SHAPE[1] * 2
    data = np.frombuffer(raw[-n:], dtype="<u2").reshape(SHAPE).copy()
    change(data)
    with open(path, "wb") as fh:
        fh.write(raw[:-n] + data.astype("<u2").tobytes())


class _Tables(HTMLParser):
    """The tables of a page, as lists of rows of cell texts, and the text
    before each (to know what comes first)."""

    def __init__(self):
        super().__init__()
        self.tables, self.headings, self._cell = [], [], None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag == "h2":
            self.headings.append(("", len(self.tables)))

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append(self._cell.strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data
        elif self.headings and not self.headings[-1][0]:
            self.headings[-1] = (data.strip(), self.headings[-1][1])


@pytest.fixture(scope="module")
def report_run(tmp_path_factory):
    """Five images: image 3 with five dead rows, image 5 blank."""
    tmp = tmp_path_factory.mktemp("report")
    paths = make_smv_sweep(tmp / "data")
    _set_pixels(paths[2], lambda d: d.__setitem__(DAMAGED_ROWS, 0))
    _set_pixels(paths[4], lambda d: d.fill(0))
    run(["dials.correct_truncation", *paths, *ARGS, "nproc=1"], tmp)
    record = json.loads((tmp / "dials.correct_truncation.json").read_text())
    return tmp, paths, record, (tmp / "dials.correct_truncation.html").read_text()


@pytest.mark.slow
def test_record_holds_the_mean_pixel_value_per_shell_before_and_after(report_run):
    """The means of the valid pixels of each region, in the input and in the
    corrected images; lower after the correction wherever it changed pixels."""
    tmp, paths, record, _ = report_run
    original = ExperimentListFactory.from_filenames(paths)[0].imageset
    corrected = ExperimentListFactory.from_filenames(
        sorted(glob.glob(str(tmp / "corrected" / "*.cbf")))
    )[0].imageset
    labels = corrector_for(
        shell_geometry_of(original, 0, Settings(PARAMS)), PARAMS
    ).shell_map.labels
    images = record["sequences"][0]["images"]
    assert [len(i["shells"]) for i in images] == [
        4,
        4,
        4,
        4,
        0,
    ]  # the blank image: no shells
    for index in range(4):
        before = original.get_raw_data(index)[0].as_numpy_array().ravel()
        after = corrected.get_raw_data(index)[0].as_numpy_array().ravel()
        for region, shell in enumerate(images[index]["shells"]):
            pixels = labels == region
            assert shell["mean_before"] == pytest.approx(
                before[pixels].mean(), rel=1e-12
            )
            assert shell["mean_after"] == pytest.approx(after[pixels].mean(), rel=1e-12)
            if shell["n_changed"]:
                assert shell["mean_after"] < shell["mean_before"]


@pytest.mark.slow
def test_report_first_tells_per_shell_truncation_and_background_then_what_was_left_alone(
    report_run,
):
    _, _, record, page = report_run
    tables = _Tables()
    tables.feed(page)
    shells_table, left_alone, summary, parameters = tables.tables
    assert [heading for heading, _ in tables.headings][:2] == [
        "Imageset 1",
        "Left alone",
    ]
    assert tables.headings[1][1] == 1, (
        "the per-shell table comes before everything else"
    )

    images = record["sequences"][0]["images"][:4]
    assert len(shells_table) == 1 + 4
    for region, row in enumerate(shells_table[1:]):
        shells = [image["shells"][region] for image in images]
        before = np.mean([s["mean_before"] for s in shells])
        after = np.mean([s["mean_after"] for s in shells])
        zero = np.mean([s["zero_fraction"] for s in shells])
        assert row[0] == f"shell {region + 1}"
        assert (
            row[2] == f"{zero:.1%}"
            and row[4] == f"{before:.2f}"
            and row[5] == f"{after:.2f}"
        )
        assert int(row[7]) == sum(s["n_changed"] for s in shells)
    assert zero > 0.1 and after < before, (
        "the outer shell is truncated and its background lowered"
    )

    assert left_alone[1:] == [
        ["1", "3", "rows 100-104", "all zero (a file cut short, or a dead line?)"],
        ["1", "5", "whole image", BLANK],
    ]
    assert summary[1][:3] == ["1", "corrected", "5"]
    assert ["n_shells", "4"] in parameters and [
        "min_pixels_per_shell",
        "100",
    ] in parameters


@pytest.mark.slow
def test_report_is_self_contained(report_run):
    page = report_run[3]
    embedded = re.findall(
        r'<script type="application/gzip;base64" id="plotly-js-gzip">([^<]*)</script>',
        page,
    )
    assert len(embedded) == 1 and page.count("Plotly.newPlot") >= 5, (
        "one plotly.js copy"
    )
    assert (
        gzip.decompress(base64.b64decode(embedded[0])).decode("utf-8") == plotly_js()[0]
    )
    assert len(page) < 0.6 * len(plotly_js()[0]), "plotly.js embedded compressed"
    assert not re.search(r"<(script|link|img|iframe)\b[^>]*\b(src|href)\s*=", page), (
        "nothing loaded from elsewhere"
    )


@pytest.mark.slow
@pytest.mark.skipif(
    not browser.chromium(),
    reason="no chromium (apt-get install chromium) to render the report",
)
def test_report_renders_in_chromium(report_run, tmp_path):
    """Every graph of the page drawn by plotly (SVG), no JavaScript error."""
    tmp, _, _, page = report_run
    graphs = set(re.findall(r"var graphs_(\w+) = ", page))
    rendered = browser.render(
        str(tmp / "dials.correct_truncation.html"),
        screenshot=str(tmp_path / "report.png"),
    )
    plotted, n_svg = rendered.plots()
    assert rendered.errors == []
    assert len(graphs) >= 5 and set(plotted) == graphs and n_svg >= len(graphs)
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_records_of_either_layout_are_read():
    """Version 2 lists imagesets under "sequences" (DIALS' word since 3.0);
    a version 1 record (dials-truncfix 0.1-0.3: "sweeps", no version) reads
    the same through record.sequences."""
    from dials_truncfix.program.record import RECORD_VERSION, sequences

    images = [{"image": 1, "shells": []}]
    current = {
        "version": RECORD_VERSION,
        "sequences": [{"sequence": 1, "images": images}],
    }
    older = {"sweeps": [{"sweep": 1, "images": images}]}
    assert RECORD_VERSION == 2
    assert sequences(current) == sequences(older) == [{"sequence": 1, "images": images}]
