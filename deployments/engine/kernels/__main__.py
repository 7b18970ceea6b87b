"""`python -m deployments.engine.kernels [native|avx2]`: build our CPU kernels once (`make install`
builds `native`, what the engine runs; `make test` also builds `avx2`, the tests' second ISA)."""

import logging
import sys

from deployments.engine.kernels import ISA_FLAGS, _failed, load

logging.basicConfig(level=logging.INFO)
isa = sys.argv[1] if len(sys.argv) > 1 else "native"
if isa not in ISA_FLAGS:
    sys.exit(f"unknown ISA {isa!r}: one of {', '.join(ISA_FLAGS)}")
built = load(isa)
print(f"CPU kernels ({isa}): {built.isa if built else 'unavailable: ' + _failed.get(isa, '?')}")
