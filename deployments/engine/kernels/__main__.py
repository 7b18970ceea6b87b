"""`python -m deployments.engine.kernels`: build the int4 CPU kernel once (make install)."""

import logging

from deployments.engine.kernels import _failed, load

logging.basicConfig(level=logging.INFO)
built = load("native")
print(f"int4 CPU kernel: {built.isa if built else 'unavailable: ' + _failed.get('native', '?')}")
