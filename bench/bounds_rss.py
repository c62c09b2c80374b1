"""The daemon's memory when one connection registers 100,000 breaker names.

Not a test: it starts a real daemon with the default limits, registers
100,000 distinct names from one connection (most are refused past
``max_breakers_per_client``), and prints the daemon's VmRSS before, after,
and after that client left. With ``--idle SECONDS`` the daemon reclaims idle
breakers after that many seconds, and a last figure is taken once they are
gone.

    python bench/bounds_rss.py [--names 100000] [--idle 1.0]
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from breakerd.protocol import (
    NEED_DATA,
    Connection,
    Hello,
    Register,
    ResponseReceived,
    Status,
    StatusRequest,
)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def register_all(path: Path, names: int) -> tuple[int, int]:
    """Register ``names`` names, pipelined 1,000 at a time; (accepted, refused)."""
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(path))
    conn = Connection("client")
    sock.sendall(conn.send_request(0, Hello(1, 1, "bounds-rss", 0)))
    pending = 1
    accepted = refused = 0
    msgid = 0
    sent = 0

    def read_replies(until: int) -> None:
        nonlocal pending, accepted, refused
        while pending > until:
            event = conn.next_event()
            if event is NEED_DATA:
                conn.receive_data(sock.recv(1 << 16))
                continue
            if isinstance(event, ResponseReceived):
                pending -= 1
                if event.msgid == 0:
                    continue
                if event.error is None:
                    accepted += 1
                else:
                    refused += 1

    while sent < names:
        batch = b"".join(
            conn.send_request((msgid := msgid + 1), Register(f"name-{i:06d}", {}))
            for i in range(sent, min(names, sent + 1000))
        )
        pending += min(1000, names - sent)
        sent = min(names, sent + 1000)
        sock.sendall(batch)
        read_replies(200)
    read_replies(0)
    sock.close()
    return accepted, refused


def breakers_listed(path: Path) -> int:
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(path))
    conn = Connection("client")
    sock.sendall(conn.send_request(0, Hello(1, 1, "bounds-rss", 0)))
    total, offset, msgid = 0, 0, 0
    while True:
        msgid += 1
        sock.sendall(conn.send_request(msgid, StatusRequest(None, offset)))
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                conn.receive_data(sock.recv(1 << 20))
                continue
            if isinstance(event, ResponseReceived) and event.msgid == msgid:
                break
        status = event.result
        assert isinstance(status, Status)
        total += len(status.breakers)
        if status.next_offset is None:
            sock.close()
            return total
        offset = status.next_offset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--names", type=int, default=100_000)
    parser.add_argument("--idle", type=float, default=None, help="breaker_idle_timeout")
    parser.add_argument(
        "--rounds", type=int, default=1, help="with --idle: register, leave, reclaim; N times"
    )
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bdrss", dir="/tmp"))
    path = tmp / "s.sock"
    command = [sys.executable, "-m", "breakerd.actor.daemon", "--socket", str(path)]
    if args.idle is not None:
        (tmp / "d.toml").write_text(f"[daemon]\nbreaker_idle_timeout = {args.idle}\n")
        command += ["--config", str(tmp / "d.toml")]
    proc = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    try:
        while not path.exists():
            time.sleep(0.01)
        time.sleep(0.3)
        before = rss_mib(proc.pid)
        print(f"daemon VmRSS at start: {before:.1f} MiB")
        for round_ in range(1, (args.rounds if args.idle is not None else 1) + 1):
            t0 = time.perf_counter()
            accepted, refused = register_all(path, args.names)
            seconds = time.perf_counter() - t0
            time.sleep(0.3)
            after = rss_mib(proc.pid)
            listed = breakers_listed(path)
            print(
                f"round {round_}: {args.names:,} register attempts from one connection "
                f"in {seconds:.2f} s"
            )
            print(f"  accepted {accepted:,}, refused {refused:,}; breakers listed: {listed:,}")
            print(f"  daemon VmRSS after        {after:7.1f} MiB  (+{after - before:.1f})")
            if args.idle is not None:
                deadline = time.monotonic() + args.idle * 3 + 70
                while breakers_listed(path) and time.monotonic() < deadline:
                    time.sleep(args.idle / 4)
                print(
                    f"  after reclaim             {rss_mib(proc.pid):7.1f} MiB"
                    f"  (breakers listed: {breakers_listed(path):,})"
                )
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
