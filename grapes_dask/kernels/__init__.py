"""Numba kernels: pure functions on numpy blocks, no dask inside.

Pass 1 (per chunk, combined by label like flox's chunk / combine / finalize):
:func:`chunk_stats`, :func:`combine_stats`, :func:`finalize_stats`, :func:`contacts_table`.

Pass 2 (per region): :func:`layer_sums`, :func:`combine_layers`, :func:`finalize_layers`.

Surface-area tables: :func:`surface_area_lut`.
"""

from .layers import combine_layers, finalize_layers, fused_layer_sums, fused_layer_sums_aniso, layer_sums
from .reduce import (
    StatsPartial,
    chunk_stats,
    combine_stats,
    contacts_table,
    finalize_stats,
    stats_columns,
)
from .surface import surface_area_lut

__all__ = [
    "StatsPartial",
    "chunk_stats",
    "combine_layers",
    "combine_stats",
    "contacts_table",
    "finalize_layers",
    "finalize_stats",
    "fused_layer_sums",
    "fused_layer_sums_aniso",
    "layer_sums",
    "stats_columns",
    "surface_area_lut",
]
