"""Numba CUDA kernels of the prototype layer, one module per stage.

* :mod:`.pooling` -- stage 1, composite tokens (sequence and head pooling);
* :mod:`.scores` -- stage 2, block scores (row softmax statistics, then block sums);
* :mod:`.selection` -- stage 3, top-P selection with forced blocks;
* :mod:`.attention` -- stage 4, block-sparse attention (FlashAttention-2 forward).

Importing these modules imports numba; :mod:`unisparse_ref.numba_backend` does so only when
the backend is built.
"""

import os

#: True in Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``), where kernels run on the CPU.
SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
