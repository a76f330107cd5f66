"""CUDA C++ sources of the CuPy backend (``*.cu``), shipped as ``unisparse_ref.raw_kernels``."""
