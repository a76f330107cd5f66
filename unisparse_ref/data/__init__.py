"""Data files shipped with the package (golden vectors)."""
