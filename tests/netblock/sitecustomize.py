"""Loaded by subprocesses of the test suite (on PYTHONPATH): any outgoing connection fails loudly."""

import os
import socket

if os.environ.get("HEADSTART_BLOCK_NETWORK") == "1":
    _orig_connect = socket.socket.connect

    def _refuse(self, address):
        if self.family == socket.AF_UNIX:
            return _orig_connect(self, address)
        host = address[0] if isinstance(address, tuple) else address
        if host in ("127.0.0.1", "localhost", "::1"):
            return _orig_connect(self, address)
        raise RuntimeError(f"network access blocked in tests: connect to {address!r}")

    socket.socket.connect = _refuse
    socket.create_connection = lambda address, *a, **k: _refuse(socket.socket(), address)
