"""sd_notify(3) without libsystemd: one datagram to the socket named by $NOTIFY_SOCKET.

A ``Type=notify`` unit is "started" only when the daemon sends ``READY=1``; Sparrow sends it once
both listeners are bound. ``STOPPING=1`` tells systemd the stop is under way. Outside systemd
(``NOTIFY_SOCKET`` unset) every call is a no-op.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping


def notify_address(env: Mapping[str, str] | None = None) -> str | None:
    """The AF_UNIX address to send to: a path, or an abstract name (leading '@' becomes NUL)."""
    env = os.environ if env is None else env
    name = env.get("NOTIFY_SOCKET")
    if not name:
        return None
    if name.startswith("@"):
        return "\0" + name[1:]
    if name.startswith("/"):
        return name
    return None  # vsock: and other transports are not supported


def notify(state: str, env: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1\\nSTATUS=serving"``). True if sent; False when not under systemd.

    Raises OSError when the socket is named but the send fails.
    """
    address = notify_address(env)
    if address is None:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.sendto(state.encode(), address)
    return True


def ready(status: str = "") -> bool:
    return notify("READY=1" + (f"\nSTATUS={status}" if status else ""))


def stopping(status: str = "") -> bool:
    return notify("STOPPING=1" + (f"\nSTATUS={status}" if status else ""))
