"""Collector declarations, one module per family; each module exposes a ``COLLECTORS`` tuple."""
