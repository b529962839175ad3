"""Pure protocol state machines (DESIGN §4): events in, actions out; no sockets, threads, clocks or files."""
