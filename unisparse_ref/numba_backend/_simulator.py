"""Whether the Numba layer runs in Numba's CUDA simulator, and a launch helper for it.

Private to :mod:`unisparse_ref.numba_backend`: the stage modules import it (it imports
nothing of the project, and not numba), so they never import the package ``__init__``.
"""

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

#: True in Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``), where kernels run on the CPU.
SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


@contextmanager
def simulator_launch(switch_interval: float = 1e-3) -> Iterator[None]:
    """Wrap kernel launches; in the simulator, make its barriers cheap for the duration.

    The simulator runs every CUDA thread as a Python thread, and a ``cuda.syncthreads()``
    waits until each of them has been scheduled, which takes about one interpreter switch
    interval (5 ms by default). A shorter interval during the launch makes barrier-heavy
    kernels (the attention) several times faster there. On a GPU this does nothing.
    """
    if not SIMULATOR:
        yield
        return
    old = sys.getswitchinterval()
    sys.setswitchinterval(min(old, switch_interval))
    try:
        yield
    finally:
        sys.setswitchinterval(old)
