"""Only here for ``cffi_modules`` (setuptools reads everything else from pyproject.toml).

The cffi module needs libfabric's headers (``libfabric-dev``). Without them the
package still installs, without the compiled binding, and using a libfabric
provider raises an error that says what to install.
"""

import os
import sys

from setuptools import setup


def _have_libfabric_headers() -> bool:
    if os.environ.get("DERECHO_VERBS_FORCE_BUILD"):
        return True
    dirs = ["/usr/include", "/usr/local/include"] + [p for p in os.environ.get("CPATH", "").split(":") if p]
    return any(os.path.exists(os.path.join(d, "rdma", "fabric.h")) for d in dirs)


kwargs = {}
if _have_libfabric_headers():
    kwargs["cffi_modules"] = ["derecho_transport_verbs/_build_ffi.py:ffibuilder"]
else:
    print("derecho-transport-verbs: libfabric headers not found (apt-get install libfabric-dev); "
          "installing without the libfabric binding", file=sys.stderr)

setup(**kwargs)
