"""``relay serve --workers N``: uvicorn's worker supervisor, with a listening socket of
each worker's own.

uvicorn binds one socket in the parent and every worker accepts from it. Whichever
worker wakes first takes every connection waiting in the backlog, so a client that
opens its connections together (a load balancer, a CDP's sender pool) can land all of
them on one worker while the others idle: 16 keep-alive connections split 16/0 and
1/15 in our measurements (decision 0018). With ``SO_REUSEPORT`` each worker listens on
a socket of its own, bound to the same address, and the kernel spreads new
connections over them by a hash of the connection's addresses; a worker that dies
takes its socket with it, so no connection is queued where nobody accepts.

uvicorn's ``Multiprocess`` is kept for what it does well (health checks, restarting a
dead worker, SIGHUP, SIGTTIN/SIGTTOU); it hands every worker the sockets it was given,
pickled. ``OwnSocket`` is what it is given instead: pickled into a worker, it becomes a
new socket bound there.
"""

from __future__ import annotations

import contextlib
import socket
from typing import Any, cast

import uvicorn
from uvicorn.supervisors import Multiprocess


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) that other sockets of this user may share."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class OwnSocket:
    """Stands for a listening socket in the supervisor; each worker that unpickles it
    binds a socket of its own (``reuse_port_socket``)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port

    def __reduce__(self) -> tuple[Any, tuple[str, int]]:
        return reuse_port_socket, (self.host, self.port)


def run_workers(config: uvicorn.Config) -> None:
    """Run ``config.workers`` workers until a signal ends them, as ``uvicorn.run`` would."""
    # Bound but never listening, this socket accepts nothing: it holds the port for the
    # workers' sockets (a port taken by another program fails here, before any worker
    # starts) and is closed when the supervisor ends.
    with reuse_port_socket(config.host, config.port) as held:
        # The port bound, not the one asked for: with port 0 every worker must still
        # listen on the same one.
        port = held.getsockname()[1]
        sockets = cast(list[socket.socket], [OwnSocket(config.host, port)])
        with contextlib.suppress(KeyboardInterrupt):
            Multiprocess(config, sockets=sockets).run()
