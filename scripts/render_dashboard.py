#!/usr/bin/env python3
"""Render a Grafana dashboard of config/grafana/ as a static PNG, from a real Prometheus.

Grafana itself is not needed (nor installed here): every panel target is asked of
Prometheus's HTTP API (``query_range`` for time series, an instant query for stat
panels) and drawn as inline SVG in an HTML page laid out by the panels' gridPos,
which headless Chromium (Debian's ``chromium-headless-shell``) screenshots. The
picture is a static render of the dashboard's queries, not Grafana.

Two ways to get the data:

    # an existing Prometheus that scrapes dedupe-consumer instances
    python scripts/render_dashboard.py config/grafana/overview.json \\
        --prometheus http://127.0.0.1:9090 --topic payments --minutes 60 -o overview.png

    # a demo run: a topic on a real broker, a consumer with /metrics, a Prometheus
    # (loopback, temporary directory, 1 s scrapes), traffic with duplicates, conflicts
    # and dead letters for --seconds; then every dashboard given is rendered
    python scripts/render_dashboard.py config/grafana/overview.json config/grafana/on-call.json \\
        --demo --bootstrap 127.0.0.1:19092 --seconds 90 --out-dir docs/img

Exit codes: 0 rendered; 1 a failure (Prometheus unreachable or failed, Chromium
failed); 2 a usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import html
import json
import math
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package

from dedupe_consumer.testing.prometheus import (
    PanelQuery,
    Prometheus,
    PrometheusError,
    api,
    dashboard_queries,
    free_port,
)

WIDTH = 1600
ROW_PX = 30  # Grafana's height of one gridPos unit
GAP = 8
PALETTE = ["#73BF69", "#F2CC0C", "#8AB8FF", "#FF780A", "#F2495C", "#5794F2", "#B877D9", "#FADE2A"]
STAT_COLORS = {"green": "#73BF69", "orange": "#FF9830", "red": "#F2495C"}


# -- values and units ----------------------------------------------------------------------


def fmt(value: float, unit: str, decimals: int | None = None) -> str:  # noqa: PLR0911
    if not math.isfinite(value):
        return "-"
    if decimals is not None and unit in ("short", "none"):
        return f"{value:,.{decimals}f}"
    if unit == "percentunit":
        return f"{value * 100:.1f}%"
    if unit == "s":
        if value == 0:
            return "0 s"
        if abs(value) < 1e-3:
            return f"{value * 1e6:.0f} µs"
        return f"{value * 1e3:.1f} ms" if abs(value) < 1 else f"{value:.2f} s"
    if unit == "bytes":
        for scale, name in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
            if abs(value) >= scale:
                return f"{value / scale:.1f} {name}"
        return f"{value:.0f} B"
    suffix = "/s" if unit == "ops" else ""
    if abs(value) >= 1e6:
        return f"{value / 1e6:.1f}M{suffix}"
    if abs(value) >= 1e4:
        return f"{value / 1e3:.1f}k{suffix}"
    if value == int(value):
        return f"{value:.0f}{suffix}"
    return f"{value:.2f}{suffix}"


def legend(template: str, labels: dict[str, str]) -> str:
    out = template
    for key, value in labels.items():
        out = out.replace("{{" + key + "}}", value).replace("{{ " + key + " }}", value)
    return out or json.dumps(labels)


CSS = """
body {
  margin:0;
  background:#111217;
  color:#ccccdc;
  font-family:Inter,"DejaVu Sans",Helvetica,Arial,sans-serif;
}
.top {
  position:absolute;
  left:8px;
  top:10px;
  font-size:18px;
  color:#d8d9da;
}
.top small {
  color:#8e8e8e;
  font-size:12px;
  margin-left:14px;
}
.panel {
  position:absolute;
  background:#181b1f;
  border:1px solid #2c3235;
  border-radius:3px;
  overflow:hidden;
  box-sizing:border-box;
  padding:0 8px;
}
.title {
  font-size:13px;
  font-weight:500;
  color:#d8d9da;
  height:30px;
  line-height:30px;
  white-space:nowrap;
  overflow:hidden;
}
.grid {
  stroke:#2c3235;
  stroke-width:1;
}
.axis {
  fill:#8e8e8e;
  font-size:10px;
}
.legend {
  font-size:11px;
  color:#ccccdc;
  line-height:20px;
}
.legend span {
  margin-right:14px;
  white-space:nowrap;
}
.legend i {
  display:inline-block;
  width:14px;
  height:4px;
  margin-right:5px;
  vertical-align:middle;
  border-radius:2px;
}
.stat {
  display:flex;
  align-items:center;
  justify-content:center;
  font-weight:500;
}
.nodata {
  display:flex;
  align-items:center;
  justify-content:center;
  color:#8e8e8e;
}
.foot {
  position:absolute;
  left:8px;
  font-size:11px;
  color:#6e6e6e;
}
"""


# -- drawing -------------------------------------------------------------------------------


def timeseries_svg(
    series: list[tuple[str, list[tuple[float, float]]]], unit: str, w: int, h: int
) -> str:
    left, right, top, bottom = 70, 10, 8, 22
    points = [(t, v) for _, pts in series for t, v in pts if math.isfinite(v)]
    if not points:
        return f'<div class="nodata" style="height:{h}px">No data</div>'
    t0, t1 = min(t for t, _ in points), max(t for t, _ in points)
    lo, hi = min(0.0, *(v for _, v in points)), max(v for _, v in points)
    if hi == lo:
        hi = lo + 1
    t1 = t1 if t1 > t0 else t0 + 1

    def x(t: float) -> float:
        return left + (t - t0) / (t1 - t0) * (w - left - right)

    def y(v: float) -> float:
        return top + (1 - (v - lo) / (hi - lo)) * (h - top - bottom)

    parts = [f'<svg width="{w}" height="{h}" xmlns="http://www.w3.org/2000/svg">']
    for i in range(5):  # horizontal grid with value labels
        v = lo + (hi - lo) * i / 4
        parts.append(
            f'<line x1="{left}" x2="{w - right}" y1="{y(v):.1f}" y2="{y(v):.1f}" class="grid"/>'
            f'<text x="{left - 6}" y="{y(v) + 4:.1f}" class="axis" text-anchor="end">'
            f"{html.escape(fmt(v, unit))}</text>"
        )
    for i in range(5):  # time labels
        t = t0 + (t1 - t0) * i / 4
        anchor = "start" if i == 0 else "end" if i == 4 else "middle"
        parts.append(
            f'<text x="{x(t):.1f}" y="{h - 6}" class="axis" text-anchor="{anchor}">'
            f"{time.strftime('%H:%M:%S', time.localtime(t))}</text>"
        )
    for i, (_, pts) in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        runs: list[list[tuple[float, float]]] = [[]]
        for t, v in pts:  # a gap (NaN) breaks the line
            if math.isfinite(v):
                runs[-1].append((t, v))
            elif runs[-1]:
                runs.append([])
        for run in runs:
            if len(run) == 1:
                parts.append(
                    f'<circle cx="{x(run[0][0]):.1f}" cy="{y(run[0][1]):.1f}" r="2" '
                    f'fill="{color}"/>'
                )
            elif run:
                line = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in run)
                area = f"{x(run[0][0]):.1f},{y(lo):.1f} {line} {x(run[-1][0]):.1f},{y(lo):.1f}"
                parts.append(f'<polygon points="{area}" fill="{color}" fill-opacity="0.10"/>')
                parts.append(
                    f'<polyline points="{line}" fill="none" stroke="{color}" stroke-width="1.5"/>'
                )
    parts.append("</svg>")
    return "".join(parts)


def stat_html(
    value: float, unit: str, decimals: int | None, steps: list[dict[str, Any]], h: int
) -> str:
    color = STAT_COLORS["green"]
    for step in steps:
        if step.get("value") is None or (math.isfinite(value) and value >= step["value"]):
            color = STAT_COLORS.get(step["color"], step["color"])
    size = max(24, min(56, h // 2))
    return (
        f'<div class="stat" style="height:{h}px;color:{color};font-size:{size}px">'
        f"{html.escape(fmt(value, unit, decimals))}</div>"
    )


# -- a dashboard ---------------------------------------------------------------------------


def render_page(
    board_path: Path, base_url: str, topic: str, start: float, end: float
) -> tuple[str, int]:
    """The HTML page of one dashboard over [start, end], and its height in pixels."""
    board = json.loads(board_path.read_text())
    span = max(60.0, end - start)
    step = max(1.0, round(span / 300))
    variables = {
        "topic": topic,
        "__rate_interval": f"{max(15, int(4 * step))}s",
        "__range": f"{int(span)}s",
        "datasource": "prometheus",
    }
    queries = dashboard_queries(board_path, variables)
    by_panel: dict[str, list[PanelQuery]] = {}
    for query in queries:
        by_panel.setdefault(query.panel, []).append(query)
    col = (WIDTH - GAP) / 24
    header = 48
    panels_html = []
    bottom = 0
    for panel in board["panels"]:
        grid = panel["gridPos"]
        left, top = GAP + grid["x"] * col, header + grid["y"] * ROW_PX
        w, h = grid["w"] * col - GAP, grid["h"] * ROW_PX - GAP
        bottom = max(bottom, int(top + h))
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
        body_h = int(h - 34)
        if panel["type"] == "stat":
            steps = panel["fieldConfig"]["defaults"].get("thresholds", {}).get("steps", [])
            values = [
                float(s["value"][1])
                for q in by_panel[panel["title"]]
                for s in api(base_url, "query", query=q.expr, time=end)["result"]
            ]
            decimals = panel["fieldConfig"]["defaults"].get("decimals")
            body = stat_html(values[0] if values else math.nan, unit, decimals, steps, body_h)
            legend_html = ""
        else:
            series: list[tuple[str, list[tuple[float, float]]]] = []
            for q in by_panel[panel["title"]]:
                data = api(base_url, "query_range", query=q.expr, start=start, end=end, step=step)
                for s in data["result"]:
                    pts = [(float(t), float(v)) for t, v in s["values"]]
                    series.append((legend(q.legend, s["metric"]), pts))
            series.sort(key=lambda item: item[0])
            legend_h = 20 * min(3, math.ceil(len(series) / 4)) if series else 0
            body = timeseries_svg(series, unit, int(w - 16), body_h - legend_h)
            legend_html = (
                '<div class="legend">'
                + "".join(
                    f'<span><i style="background:{PALETTE[i % len(PALETTE)]}"></i>'
                    f"{html.escape(name)}</span>"
                    for i, (name, _) in enumerate(series[:12])
                )
                + "</div>"
            )
        panels_html.append(
            f'<div class="panel" style="left:{left:.0f}px;top:{top:.0f}px;'
            f'width:{w:.0f}px;height:{h:.0f}px">'
            f'<div class="title">{html.escape(panel["title"].replace("$__range", "range"))}</div>'
            f"{body}{legend_html}</div>"
        )
    height = bottom + GAP + 26
    stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(end))
    subtitle = f"topic = {topic} · {stamp} · {int(span)} s"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><style>
{CSS}</style></head><body>
<div class="top">{html.escape(board["title"])}<small>{html.escape(subtitle)}</small></div>
{"".join(panels_html)}
<div class="foot" style="top:{bottom + GAP + 4}px">Static render of
{html.escape(board_path.name)}'s queries against a real Prometheus
(scripts/render_dashboard.py), not Grafana.</div>
</body></html>"""
    return page, height


def screenshot(page: str, height: int, out: Path, chromium: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        html_file = Path(tmp) / "dashboard.html"
        html_file.write_text(page)
        out.parent.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                f"--user-data-dir={tmp}/profile",
                f"--screenshot={out.resolve()}",
                f"--window-size={WIDTH},{height}",
                html_file.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if result.returncode != 0 or not out.exists():
            tail = "\n".join((result.stderr or result.stdout).splitlines()[-5:])
            raise RuntimeError(f"{chromium} failed (exit {result.returncode}): {tail}")


# -- a demo run ----------------------------------------------------------------------------


@contextlib.contextmanager
def demo(bootstrap: str, seconds: float, workdir: Path) -> Iterator[tuple[str, str, float]]:
    """A topic, a consumer serving /metrics, a Prometheus scraping it and traffic for
    ``seconds``; yields (Prometheus URL, topic, start time) with everything still running."""
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    from dedupe_consumer import DedupeConsumer, Event, Handler, Settings
    from dedupe_consumer.observability import Metrics

    topic = f"payments-demo-{uuid.uuid4().hex[:6]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, 3, 1)])[topic].result(30)
    port = free_port()
    settings = Settings.load(
        kafka={"bootstrap_servers": bootstrap, "group_id": f"g-{topic}", "topics": [topic]},
        store={"path": str(workdir / "state")},
        processing={"dead_letter_topic": f"{topic}.dlq", "poll_timeout": "200ms"},
        dedupe={"on_conflict": "skip"},
        observability={"metrics_port": port, "progress_interval": "0s", "log_level": "warning"},
    )

    class Payments(Handler):
        def handle(self, event: Event) -> None:
            time.sleep(0.004)

    metrics = Metrics()  # one registry across the restart, as one process would keep

    def start_consumer() -> tuple[threading.Event, threading.Thread]:
        stop = threading.Event()
        consumer = DedupeConsumer(Payments(), settings, metrics=metrics)
        runner = threading.Thread(
            target=lambda: consumer.run(
                until=lambda t: stop.is_set(), install_signal_handlers=False
            )
        )
        runner.start()
        return stop, runner

    with Prometheus([f"127.0.0.1:{port}"], workdir / "prometheus") as prom:
        start = time.time()
        stop, runner = start_consumer()
        restarted = False
        producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
        rng = random.Random(7)
        known: list[str] = []
        try:
            while time.time() - start < seconds:
                phase = (time.time() - start) / seconds
                if phase > 0.5 and not restarted:  # a deploy: the restart restores
                    restarted = True  # from the changelog, a backlog builds meanwhile
                    stop.set()
                    runner.join(30)
                    stop, runner = start_consumer()
                rate = 40 + 60 * math.sin(phase * math.pi)  # a daily-looking curve
                share = 0.05 + 0.15 * phase  # duplicates become more frequent
                for _ in range(int(rate / 2)):
                    roll = rng.random()
                    if known and roll < share:
                        event_id = rng.choice(known[-500:])
                        value = json.dumps({"id": event_id}).encode()
                    else:
                        event_id = str(uuid.UUID(int=rng.getrandbits(128)))
                        known.append(event_id)
                        value = json.dumps({"id": event_id}).encode()
                    headers = [("event-id", event_id.encode())]
                    if roll > 0.996:  # a message without an ID: a dead letter
                        headers = []
                    elif roll > 0.993 and len(known) > 10:  # a reused ID: a conflict
                        event_id = rng.choice(known[-500:])
                        value, headers = b'{"changed": true}', [("event-id", event_id.encode())]
                    producer.produce(topic, key=event_id.encode(), value=value, headers=headers)
                producer.flush(10)
                time.sleep(0.5)
            time.sleep(3)  # the last decisions scraped
            yield prom.url, topic, start
        finally:
            stop.set()
            runner.join(30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dashboards", nargs="+", type=Path, help="dashboard JSON files")
    parser.add_argument("--prometheus", help="URL of a Prometheus that scrapes consumers")
    parser.add_argument("--topic", default=".*", help="value of $topic (a regex; default all)")
    parser.add_argument("--minutes", type=float, default=60, help="time range with --prometheus")
    parser.add_argument("--demo", action="store_true", help="run a consumer and a Prometheus")
    parser.add_argument("--bootstrap", default="127.0.0.1:9092", help="broker for --demo")
    parser.add_argument("--seconds", type=float, default=90, help="traffic time with --demo")
    parser.add_argument("-o", "--output", type=Path, help="PNG path (one dashboard)")
    parser.add_argument("--out-dir", type=Path, help="directory: dashboard-<name>.png each")
    parser.add_argument("--chromium", default="chromium-headless-shell")
    args = parser.parse_args(argv)
    if bool(args.prometheus) == args.demo:
        parser.error("give either --prometheus URL or --demo")
    if args.output and len(args.dashboards) > 1:
        parser.error("-o takes one dashboard; use --out-dir for several")
    for path in args.dashboards:
        if not path.is_file():
            parser.error(f"{path}: no such dashboard file")
    chromium = shutil.which(args.chromium)
    if chromium is None:
        parser.error(f"{args.chromium} not found: apt-get install chromium-headless-shell")

    def outputs() -> list[Path]:
        if args.output:
            return [args.output]
        out_dir = args.out_dir or Path(".")
        return [out_dir / f"dashboard-{p.stem}.png" for p in args.dashboards]

    def render_all(url: str, topic: str, start: float, end: float) -> None:
        for path, out in zip(args.dashboards, outputs(), strict=True):
            page, height = render_page(path, url, topic, start, end)
            screenshot(page, height, out, chromium)
            print(f"{out}: {path.name}, {WIDTH}x{height}")

    try:
        if args.demo:
            with (
                tempfile.TemporaryDirectory() as tmp,
                demo(args.bootstrap, args.seconds, Path(tmp)) as (
                    url,
                    topic,
                    start,
                ),
            ):
                render_all(url, topic, start, time.time())
        else:
            end = time.time()
            render_all(args.prometheus, args.topic, end - args.minutes * 60, end)
    except (PrometheusError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
