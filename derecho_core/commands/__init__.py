"""Sub-commands of the ``derecho`` command, one module each (see :mod:`derecho_core.cli`)."""
