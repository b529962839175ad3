#!/usr/bin/env python3
"""Thin script for ``derecho bench persistence`` (see derecho_core/benchmarks/persistence.py)."""

import sys

from derecho_core.benchmarks.persistence import main

if __name__ == "__main__":
    sys.exit(main())
