"""Numba CUDA kernels of the prototype layer, one module per stage.

* :mod:`.pooling` -- stage 1, composite tokens (sequence and head pooling);
* :mod:`.scores` -- stage 2, block scores (row softmax statistics, then block sums);
* :mod:`.selection` -- stage 3, top-P selection with forced blocks;
* :mod:`.attention` -- stage 4, block-sparse attention (FlashAttention-2 forward).

Importing these modules imports numba; :mod:`unisparse_ref.numba_backend` does so only when
the backend is built.
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
