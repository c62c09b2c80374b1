"""Run every breakerd benchmark and write ``bench/RESULTS.md``.

``python bench/run_all.py [--quick] [--output PATH]`` runs ``bench_embedded.py``
(scenario a, in-process), ``bench_daemon.py`` (scenarios b to g, daemon
mode) and ``bench_status.py`` (the ``breakerd status`` command's wall time),
each in its own process, one after the other. Their tables
stream to this terminal as they come; afterwards the goals are
printed with MET / NOT MET, and everything (the machine, the goals, the full
output of both) is written to ``bench/RESULTS.md`` (or ``--output``).

A full run takes about three minutes on 2 vCPUs; ``--quick`` about one.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from bench_daemon import spawn  # noqa: E402
from bench_embedded import breakerd_source  # noqa: E402

PACKAGES = (
    "breakerd",
    "purgatory",
    "aiobreaker",
    "circuitbreaker",
    "pybreaker",
    "msgpack",
    "structlog",
    "anyio",
    "uvloop",
)


@dataclass
class Row:
    text: str
    figure: str
    target: str
    met: bool | None

    @property
    def verdict(self) -> str:
        return {True: "MET", False: "NOT MET", None: "n/a"}[self.met]


# -- the machine ---------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def mem_total() -> str:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def machine() -> dict[str, str]:
    versions = []
    for name in PACKAGES:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name} (not installed)")
    return {
        "Date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "CPU": cpu_model(),
        "Cores": f"{os.cpu_count()} logical CPUs ({len(os.sched_getaffinity(0))} usable here)",
        "Memory": mem_total(),
        "OS": f"{platform.system()} {platform.release()} ({platform.machine()})",
        "Python": f"{platform.python_implementation()} {platform.python_version()}",
        "Switch interval": f"{sys.getswitchinterval() * 1000:g} ms (the GIL's)",
        "Packages": ", ".join(versions),
        "breakerd source": breakerd_source(),
        "Load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


# -- running the benchmarks ------------------------------------------------------------------


def run_tee(argv: Sequence[str]) -> tuple[int, str]:
    """Run a benchmark, streaming its output here; returns (exit status, output)."""
    proc = spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=0)
    assert proc.stdout is not None
    chunks: list[bytes] = []
    try:
        while True:
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            chunks.append(chunk)
            sys.stdout.write(chunk.decode(errors="replace"))
            sys.stdout.flush()
        code = proc.wait()
    finally:
        if proc.poll() is None:
            proc.terminate()  # its SIGTERM handler stops its daemons and workers
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        proc.stdout.close()
    return code, b"".join(chunks).decode(errors="replace")


# -- goals -----------------------------------------------------------------------------------


def embedded_rows(report: dict[str, Any]) -> list[Row]:
    rows = []
    scenarios = report["scenarios"]
    ratios = report["ratios"]
    a = scenarios["a_async_success"]["contenders"]
    best = next((peer, r) for peer, r in ratios["a_async_success"].items() if r.get("best_peer"))
    ratio = best[1]["ratio_of_medians"]
    rows.append(
        Row(
            "Embedded `call` overhead vs the fastest async peer",
            f"{ratio:.2f}x vs {best[0]} ({a['breakerd']['overhead_us']['median']:.3f} us vs "
            f"{a[best[0]]['overhead_us']['median']:.3f} us)",
            "<= 0.8x",
            ratio <= 0.8,
        )
    )
    b = scenarios["b_sync_success"]["contenders"]
    ratio = ratios["b_sync_success"]["pybreaker"]["ratio_of_medians"]
    rows.append(
        Row(
            "Embedded `call_sync` overhead vs pybreaker (bench_embedded's own target)",
            f"{ratio:.2f}x ({b['breakerd']['overhead_us']['median']:.3f} us vs "
            f"{b['pybreaker']['overhead_us']['median']:.3f} us)",
            "<= 0.5x",
            ratio <= 0.5,
        )
    )
    for key, label in (("c_async_rejection", "`call`"), ("c_sync_rejection", "`call_sync`")):
        c = scenarios[key]["contenders"]
        ratio = ratios[key]["circuitbreaker"]["ratio_of_medians"]
        rows.append(
            Row(
                f"Embedded rejection ({label}, breaker open) vs circuitbreaker's",
                f"{ratio:.2f}x ({c['breakerd']['overhead_us']['median']:.3f} us vs "
                f"{c['circuitbreaker']['overhead_us']['median']:.3f} us)",
                "< 1.0x",
                ratio < 1.0,
            )
        )
    return rows


def daemon_rows(report: dict[str, Any]) -> list[Row]:
    return [Row(g["text"], g["figure"], g["target"], g["met"]) for g in report.get("goals", [])]


def goals_table(rows: Sequence[Row]) -> str:
    lines = ["| Goal | Figure | Target | Verdict |", "|---|---|---|---|"]
    for r in rows:
        figure = r.figure.replace("|", "/")
        lines.append(f"| {r.text} | {figure} | {r.target} | **{r.verdict}** |")
    return "\n".join(lines)


def write_results(
    path: Path,
    info: dict[str, str],
    rows: Sequence[Row],
    outputs: Sequence[tuple[str, str, float]],
    quick: bool,
) -> None:
    parts = [
        "# breakerd benchmark results",
        "",
        f"Written by `python bench/run_all.py{' --quick' if quick else ''}`; "
        "what each scenario measures is in `bench/README.md`. "
        "The machine is shared with other work: compare the ratios within this run, "
        "not absolute numbers across runs or machines.",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in info.items()),
        "",
        "## Goals",
        "",
        goals_table(rows),
        "",
        "## Full output",
    ]
    for name, text, seconds in outputs:
        parts += ["", f"### `{name}` ({seconds:.0f} s)", "", "```text", text.rstrip(), "```"]
    path.write_text("\n".join(parts) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="run every breakerd benchmark")
    parser.add_argument("--quick", action="store_true", help="smaller runs (about a minute)")
    parser.add_argument(
        "--output", type=Path, default=HERE / "RESULTS.md", help="default: bench/RESULTS.md"
    )
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    info = machine()
    started = time.monotonic()
    flag = ["--quick"] if args.quick else []
    outputs: list[tuple[str, str, float]] = []
    rows: list[Row] = []
    failed = []
    with tempfile.TemporaryDirectory(prefix="bdrun") as tmp:
        for script, to_rows in (
            ("bench_embedded.py", embedded_rows),
            ("bench_daemon.py", daemon_rows),
            ("bench_status.py", daemon_rows),
        ):
            out = Path(tmp) / (script + ".json")
            print(f"\n######## {script} {' '.join(flag)} ########\n", flush=True)
            t0 = time.monotonic()
            code, text = run_tee([sys.executable, str(HERE / script), *flag, "--json", str(out)])
            outputs.append((script, text, time.monotonic() - t0))
            if code != 0 or not out.exists():
                failed.append(f"{script} exited with status {code}")
                continue
            rows.extend(to_rows(json.loads(out.read_text())))
    info["Load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    info["Total time"] = f"{time.monotonic() - started:.0f} s"
    write_results(args.output, info, rows, outputs, args.quick)
    print()
    print("######## goals ########")
    for r in rows:
        print(f"   {r.verdict:<8} {r.text}: {r.figure}  [goal {r.target}]")
    for failure in failed:
        print(f"   FAILED   {failure}")
    print(f"\nwrote {args.output} ({info['Total time']})")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
