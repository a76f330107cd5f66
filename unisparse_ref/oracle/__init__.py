"""Checking implementations against the reference.

- :mod:`.testing`: pass/fail comparison of any implementation's stages with the reference,
  under the tolerance rule of SPEC section 7 (:mod:`unisparse_ref.tolerance`).
- :mod:`.verify`: the ``unisparse-ref verify MODULE:FUNCTION`` command built on it.
- :mod:`.golden`: stored golden vectors (inputs and reference outputs) for implementations
  that cannot import Python.
"""
