"""The daemon's memory with 100,000 breakers and scopes held by 1,000 connected clients.

Not a test: it starts a real daemon whose limits are raised to fit (the
defaults cap a daemon at 10,000 breakers, 1,000 per client, 65,535 state
table slots), connects 1,000 clients, and has each register one parent
``key-NNNN`` and 99 scopes ``key-NNNN/model-MM`` (what ``scope="model"``
registers), pipelined. It prints the daemon's VmRSS at start, at 10,000
breakers, with every client connected and every breaker registered (and
the peak, VmHWM), and the cost per breaker. The daemon runs as configured
by default, its state file included (``--state-file none``: without one).

    python bench/scopes_rss.py [--clients 1000] [--per-client 100] [--state-file none]

The goal (issue: LLM-aware breakers): under 256 MiB.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from breakerd.protocol import NEED_DATA, Connection, Hello, Register, ResponseReceived

GOAL_MIB = 256.0


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field}")


def connect(path: Path, number: int) -> tuple[socket.socket, Connection]:
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(path))
    conn = Connection("client")
    sock.sendall(conn.send_request(0, Hello(1, 1, f"scopes-rss-{number}", 0)))
    return sock, conn


def register(sock: socket.socket, conn: Connection, names: list[str]) -> tuple[int, int]:
    """Register ``names`` pipelined on one connection; (accepted, refused)."""
    sock.sendall(
        b"".join(conn.send_request(i, Register(name, {})) for i, name in enumerate(names, 1))
    )
    pending = len(names) + 1  # and the hello's reply
    accepted = refused = 0
    while pending:
        event = conn.next_event()
        if event is NEED_DATA:
            data = sock.recv(1 << 16)
            if not data:
                raise RuntimeError("the daemon closed the connection")
            conn.receive_data(data)
            continue
        if isinstance(event, ResponseReceived):
            pending -= 1
            if event.msgid == 0:
                continue
            if event.error is None:
                accepted += 1
            else:
                refused += 1
    return accepted, refused


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--per-client", type=int, default=100, help="a parent and its scopes")
    parser.add_argument(
        "--state-file", metavar="PATH", help="the daemon's --state-file (none: off)"
    )
    args = parser.parse_args()
    total = args.clients * args.per_client
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < args.clients + 64:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, args.clients + 256), hard))
    tmp = Path(tempfile.mkdtemp(prefix="bdscope", dir="/tmp"))
    path = tmp / "s.sock"
    config = tmp / "d.toml"
    config.write_text(
        "[daemon]\n"
        f"max_connections = {args.clients + 64}\n"
        f"max_connections_per_pid = {args.clients + 64}\n"
        f"max_breakers = {total + 1000}\n"
        f"max_breakers_per_client = {max(1000, args.per_client)}\n"
        f"state_table_slots = {total + 1001}\n"
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "breakerd.actor.daemon",
            "--socket",
            str(path),
            "--config",
            str(config),
            *(["--state-file", args.state_file] if args.state_file else []),
        ],
        stderr=subprocess.DEVNULL,
    )
    peers: list[socket.socket] = []
    try:
        while not path.exists():
            if proc.poll() is not None:
                raise RuntimeError("the daemon exited")
            time.sleep(0.01)
        time.sleep(0.3)
        start = rss_mib(proc.pid)
        print(f"daemon VmRSS at start: {start:.1f} MiB")
        accepted = refused = 0
        t0 = time.perf_counter()
        for client in range(args.clients):
            sock, conn = connect(path, client)
            peers.append(sock)
            parent = f"key-{client:04d}"
            names = [parent] + [f"{parent}/model-{m:02d}" for m in range(args.per_client - 1)]
            ok, no = register(sock, conn, names)
            if accepted < 10_000 <= accepted + ok and total > 10_000:
                print(f"daemon VmRSS at {accepted + ok:,} breakers: {rss_mib(proc.pid):.1f} MiB")
            accepted += ok
            refused += no
        seconds = time.perf_counter() - t0
        # Past the state file's next write (at most a second after a change).
        time.sleep(1.5)
        held = rss_mib(proc.pid)
        print(
            f"{args.clients:,} clients connected, {accepted:,} breakers registered "
            f"({refused:,} refused) in {seconds:.1f} s"
        )
        per_breaker = (held - start) * 1024 / max(1, accepted)
        print(
            f"daemon VmRSS: {held:.1f} MiB ({per_breaker:.2f} KiB per breaker); "
            f"peak (VmHWM) {rss_mib(proc.pid, 'VmHWM'):.1f} MiB"
        )
        verdict = "MET" if held < GOAL_MIB and accepted == total else "NOT MET"
        goal = f"{total:,} breakers and scopes, {args.clients:,} clients < {GOAL_MIB:.0f} MiB"
        print(f"goal: {goal}: {verdict}")
    finally:
        for sock in peers:
            sock.close()
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
