"""Comparing UniSparse's selection with other methods.

- :mod:`.workloads`: synthetic long-context attention workloads (structured Q, K, V).
- :mod:`.baselines`: other block-selection methods (XAttention, FlexPrefill, MInference,
  SpargeAttn-style pooling, the exact mass oracle) on the reference's arrays.
- :mod:`.evaluate`: the ``unisparse-ref evaluate`` command (density against error).
"""
