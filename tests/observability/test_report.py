"""The HTML report: content, SVG structure, and a headless-Chromium render."""

from __future__ import annotations

import os
import random
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from engine.observability.profiler import PerformanceProfiler, Span
from engine.observability.report import bar_chart_svg, render_report, write_report


def build_profiler() -> PerformanceProfiler:
    """Seeded actions on a fake clock; the slowest one's narrator is its critical path."""
    now = [0.0]
    prof = PerformanceProfiler(clock=lambda: now[0])
    rng = random.Random(5)
    for i in range(40):
        with prof.trace("player_action", i=i):
            with prof.trace("context_building"):
                now[0] += rng.uniform(0.05, 0.4)
            t0 = now[0]
            ends = []
            for agent in ("archivist", "module_keeper"):  # "concurrent": same start
                now[0] = t0
                with prof.trace("agent_query", agent=agent):
                    now[0] += rng.lognormvariate(0.0, 0.6)
                ends.append(now[0])
            now[0] = max(ends)
            with prof.trace("agent_query", agent="narrator"):
                now[0] += rng.lognormvariate(0.5, 0.5) + (8.0 if i == 17 else 0.0)
            with prof.trace("state_update"):
                now[0] += 0.02
    for _ in range(50):
        prof.record("cache_lookup", rng.uniform(0.0001, 0.03))
    return prof


def test_render_report_sections_and_svg() -> None:
    prof = build_profiler()
    slowest = prof.slowest_trace("player_action")
    assert slowest is not None and slowest.attributes["i"] == 17
    page = render_report(
        prof, extra_sections=[("Strategies", bar_chart_svg("p95 by strategy", {"eager": 4.2}))]
    )
    assert page.startswith("<!DOCTYPE html>") and "http" not in page.replace(
        'xmlns="http://www.w3.org/2000/svg"', ""
    )  # self-contained: no external reference
    for op in ("player_action", "context_building", "agent_query", "state_update", "cache_lookup"):
        assert f'<svg class="cdf" data-operation="{op}"' in page
    assert page.count('class="cdf-line"') == 5
    assert page.count('class="target"') == 15  # p50/p95/p99 of the five default targets
    assert '<table class="operations">' in page and page.count("<tr>") == 6
    assert '<svg class="waterfall"' in page
    # one rect per span of the slowest tree; the narrator is on the critical path
    assert page.count('class="span') == sum(1 for _ in slowest.walk())
    critical = re.findall(r'class="span critical" data-name="([a-z_]+)"', page)
    assert critical[0] == "player_action" and "agent_query" in critical
    assert "<h2>Strategies</h2>" in page and 'class="bar"' in page


def test_report_escapes_and_handles_empty() -> None:
    prof = PerformanceProfiler()
    page = render_report(prof, title="<b>x</b>")
    assert "&lt;b&gt;x&lt;/b&gt;" in page and "<b>x</b>" not in page
    assert '<svg class="waterfall"' not in page  # no player action yet
    odd = PerformanceProfiler()
    with odd.trace("player_action", agent='"><script>'):
        pass
    assert "<script>" not in render_report(odd)


def test_bar_chart_svg_scales_to_the_largest_value() -> None:
    svg = bar_chart_svg("latency", {"sequential": 8.0, "eager": 4.0, "zero": 0.0})
    widths = [float(w) for w in re.findall(r'class="bar" x="\d+" y="\d+" width="([\d.]+)"', svg)]
    assert widths[0] == pytest.approx(2 * widths[1]) and widths[2] == 0.0
    assert svg.startswith('<svg class="bar-chart"') and svg.endswith("</svg>")


def test_waterfall_draws_a_running_child_grey() -> None:
    root = Span("player_action", {}, 0.0, end=2.0, status="ok")
    root.children.append(Span("agent_query", {"agent": "narrator"}, 1.0))  # never ended
    page = render_report(PerformanceProfiler(), slowest=root)
    assert 'fill="#9e9e9e"' in page


def _hedged_action() -> Span:
    """The hosted run's slowest action: the arbiter's first attempt failed after its
    hedge (sent after the 2.5 s hedge delay) went out; the hedge won. The module
    keeper finished at 2.4 s, just before the hedge started."""

    def sp(name: str, start: float, end: float, status: str = "ok", **attrs: object) -> Span:
        return Span(name, dict(attrs), start, end=end, status=status)

    return Span(
        "player_action",
        {},
        0.0,
        end=6.0,
        status="ok",
        children=[
            sp("context_building", 0.0, 0.05),
            sp("agent_query", 0.05, 0.051, agent="archivist", attempt=1),
            sp("agent_query", 0.051, 2.4, agent="module_keeper", attempt=1),
            sp("agent_query", 0.053, 2.8, "error", agent="arbiter", attempt=1),
            sp("agent_query", 2.5, 3.2, agent="arbiter", attempt=2),
            sp("agent_query", 3.3, 5.9, agent="narrator", attempt=1),
            sp("state_update", 5.9, 6.0),
        ],
    )


def _critical_rows(page: str) -> list[str]:
    """The labels of the waterfall rows drawn red."""
    return re.findall(r'<rect class="span critical"[^>]*><title>([^:]+):', page)


@pytest.mark.parametrize(
    "depends_on", [None, {"arbiter": ["archivist"], "narrator": ["arbiter"], "archivist": []}]
)
def test_waterfall_marks_the_winning_hedge_not_what_ended_before_it(
    depends_on: dict[str, list[str]] | None,
) -> None:
    page = render_report(PerformanceProfiler(), slowest=_hedged_action(), depends_on=depends_on)
    assert _critical_rows(page) == [
        "player_action",
        "context_building",
        "agent_query archivist",
        "agent_query arbiter (hedge)",
        "agent_query narrator",
        "state_update",
    ]


def test_write_report_passes_the_dependencies_on(tmp_path: Path) -> None:
    root = _hedged_action()
    # a made-up DAG in which the narrator waits for the module keeper only
    out = write_report(
        tmp_path / "r.html",
        PerformanceProfiler(),
        slowest=root,
        depends_on={"narrator": ["module_keeper"], "module_keeper": []},
    )
    assert _critical_rows(out.read_text(encoding="utf-8")) == [
        "player_action",
        "context_building",
        "agent_query module_keeper",
        "agent_query narrator",
        "state_update",
    ]


# ------------------------------------------------------------------ headless Chromium


def png_pixels(data: bytes) -> tuple[int, int, int, bytes]:
    """Decode an 8-bit non-interlaced RGB/RGBA PNG: (width, height, channels, raw rows)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, b""
    width = height = channels = 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, color, _c, _f, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and interlace == 0 and color in (2, 6), (depth, color)
            channels = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = width * channels
    out = bytearray()
    prev = bytearray(stride)
    for r in range(height):
        kind = raw[r * (stride + 1)]
        line = bytearray(raw[r * (stride + 1) + 1 : (r + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - channels] if i >= channels else 0
            b = prev[i]
            c = prev[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + a) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + b) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                line[i] = (line[i] + pred) & 0xFF
        out += line
        prev = line
    return width, height, channels, bytes(out)


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (CI is set: .ci/run installs it)")
        pytest.skip("chromium is not installed")
    return exe


def run_chromium(exe: str, profile: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [
            exe,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            *args,
        ],
        capture_output=True,
        timeout=120,
        check=False,
    )


@pytest.mark.browser
def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    exe = chromium()
    prof = build_profiler()
    page = write_report(
        tmp_path / "report.html",
        prof,
        extra_sections=[("Strategies", bar_chart_svg("p95", {"eager": 4.2, "level": 7.9}))],
    )
    url = page.resolve().as_uri()

    dom = run_chromium(exe, tmp_path / "profile-dom", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr.decode(errors="replace")[-2000:]
    text = dom.stdout.decode()
    assert text.count('<svg class="cdf"') == 5
    assert text.count('class="cdf-line"') == 5
    assert '<svg class="waterfall"' in text and 'class="span critical"' in text
    assert '<svg class="bar-chart"' in text

    shot = tmp_path / "report.png"
    result = run_chromium(
        exe, tmp_path / "profile-shot", f"--screenshot={shot}", "--window-size=1200,1600", url
    )
    assert shot.exists(), result.stderr.decode(errors="replace")[-2000:]
    width, height, channels, pixels = png_pixels(shot.read_bytes())
    assert (width, height) == (1200, 1600)
    total = width * height
    non_white = blue = 0
    for i in range(0, len(pixels), channels):
        r, g, b = pixels[i], pixels[i + 1], pixels[i + 2]
        if r < 245 or g < 245 or b < 245:
            non_white += 1
        if abs(r - 0x4C) < 12 and abs(g - 0x78) < 12 and abs(b - 0xA8) < 12:
            blue += 1  # the CDF lines and the waterfall bars
    assert non_white > total // 100, "the screenshot is (nearly) blank"
    assert blue > 2000, "no chart was drawn"
