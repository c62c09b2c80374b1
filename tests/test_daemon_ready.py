"""The readiness contract: the socket file appears only once the daemon accepts.

Supervisors, tests and clients wait for the file, then connect at once; a
file that exists before ``listen`` gets them ECONNREFUSED (seen under load
on 2 vCPUs, about one start in six).
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import anyio
import pytest

from breakerd.actor.daemon import Daemon, DaemonSettings


def test_the_socket_file_appears_only_once_it_listens(
    tmp_short: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_short / "s.sock"
    existed_at_listen: list[bool] = []
    real_listen = socket.socket.listen

    def listen(self: socket.socket, *args: Any) -> None:
        existed_at_listen.append(path.exists())
        real_listen(self, *args)

    monkeypatch.setattr(socket.socket, "listen", listen)
    daemon = Daemon(DaemonSettings(socket_path=path, state_table_slots=0), handle_signals=False)

    async def main() -> None:
        async with anyio.create_task_group() as group:
            await group.start(daemon.run)
            assert path.exists()
            assert path.stat().st_mode & 0o777 == 0o600
            with socket.socket(socket.AF_UNIX) as client:
                client.connect(str(path))
            daemon.stop()

    anyio.run(main)
    assert existed_at_listen[0] is False  # asyncio listens again, once it is in place
    assert not path.exists()
    assert sorted(p.name for p in tmp_short.iterdir()) == []
