"""``python -m breakerd.actor.daemon --socket PATH [--config FILE]``: run the daemon."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._serve import LOOPS, serve_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m breakerd.actor.daemon", description=__doc__)
    parser.add_argument("--socket", type=Path, default=None, help="Unix socket path")
    parser.add_argument("--config", type=Path, default=None, help="TOML config file")
    parser.add_argument(
        "--loop", choices=LOOPS, default="auto", help="event loop (auto: uvloop if installed)"
    )
    parser.add_argument(
        "--metrics", default=None, metavar="HOST:PORT", help="serve Prometheus metrics there"
    )
    parser.add_argument(
        "--state-file",
        default=None,
        metavar="PATH",
        help="where breaker state survives restarts (default: beside the socket; none: off)",
    )
    parser.add_argument(
        "--redis",
        default=None,
        metavar="URL",
        help="join the fleet through this Redis (redis://... or unix://...)",
    )
    args = parser.parse_args(argv)
    return serve_main(
        args.socket,
        args.config,
        args.loop,
        metrics=args.metrics,
        state_file=args.state_file,
        redis=args.redis,
    )


if __name__ == "__main__":
    raise SystemExit(main())
