"""The HTTP front process of ``serve --front process`` (started by ``engine_host``).

``python -m torch_elastic_kv.serve.front_process LINK_FD LISTEN_FD PARENT_PID``: it reads the
settings and the routes' state from the link, then runs uvicorn and the app on the inherited
listening socket exactly as a one-process server does (``server.serve_http``), with the engine
behind ``front_link.EngineLink``. It dies with its parent.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import sys
from typing import Optional

from .._util import die_with_parent
from .front_link import EngineLink
from .link_wire import read_frame

__all__ = ["main"]


def main(argv: Optional[list[str]] = None) -> int:
    """Serve HTTP for the engine process that started this one; returns the exit status."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3 or not all(a.isdigit() for a in args):
        print("usage: python -m torch_elastic_kv.serve.front_process LINK_FD LISTEN_FD PARENT_PID", file=sys.stderr)
        return 2
    link_fd, listen_fd, parent = (int(a) for a in args)
    die_with_parent()
    if os.getppid() != parent:
        return 1  # the engine process died before the line above: nobody to serve for
    link = socket.socket(fileno=link_fd)
    listen = socket.socket(fileno=listen_fd)
    init = read_frame(link)
    if init is None:
        return 1
    settings = init["settings"]
    logging.basicConfig(level=settings.log_level.upper(), format="%(message)s", stream=sys.stderr)
    state = dataclasses.replace(init["state"], service=EngineLink(link, init["vocab_size"]))
    from .http_server import serve_http

    return serve_http(settings, state, listen)


if __name__ == "__main__":
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # as serve: nothing to finalize, and teardown would hold the exit up
