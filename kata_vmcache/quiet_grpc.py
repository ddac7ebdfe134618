"""Imported before grpc by the command line, for its side effect: grpc's core logging off.

grpc's core writes lines of its own to stderr (`E1125 16:39:40.387751 ... File descriptor
limit reached. Retrying.`), one a second while it cannot accept a connection for want of
file descriptors, and more for failures we report ourselves in one line (a socket that
cannot be bound, a server that is not there). The daemon and the CLI say what matters once,
in their own words; `GRPC_VERBOSITY=error` (or `debug`) brings grpc's lines back. grpc reads
the variable when it is first imported, hence a module of its own, imported first.
"""

import os

os.environ.setdefault("GRPC_VERBOSITY", "NONE")
