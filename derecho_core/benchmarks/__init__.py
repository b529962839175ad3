"""Benchmarks run by ``derecho bench <name>``: each module defines ``add_arguments(parser)`` and ``run(args) -> int``."""
