"""Numba CUDA kernels of the prototype layer, one module per stage."""
