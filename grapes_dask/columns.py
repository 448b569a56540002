"""Column names shared by the particle table, the statistics, the operando tracking and the figures.

Only names, in one place, so that a renamed column is renamed everywhere. The particle table's
own columns are defined by :mod:`grapes_dask.table` and re-exported here unchanged.

- :data:`PROFILE_COLUMNS`, :data:`ROI_COLUMNS`: the particle table's radial profile list columns
  and region-of-interest columns (``ROI_COLUMNS`` maps each name to its dtype);
- :data:`GROUP_PROFILES`: the profile columns summarised per group by
  :func:`grapes_dask.stats.quantile_groups`, and :data:`GROUP_STATS` / :data:`SCALAR_STATS`, the
  suffixes of its statistics (``radial_layers_graylevel-mean``, ``roi_mean-median``);
- :data:`POPULATION_FIELDS`: the fields of :class:`grapes_dask.stats.PopulationStats` (eq. 3-5);
- :data:`LONG_COLUMNS`, :data:`SUMMARY_COLUMNS`, :data:`BY_QUANTILE_COLUMNS`,
  :data:`Z_TEST_COLUMNS`, :data:`REASONS`: the tables of :mod:`grapes_dask.track`.
"""

from __future__ import annotations

from .table import PROFILE_COLUMNS, ROI_COLUMNS

__all__ = [
    "PROFILE_COLUMNS",
    "ROI_COLUMNS",
    "GROUP_PROFILES",
    "GROUP_STATS",
    "SCALAR_STATS",
    "POPULATION_FIELDS",
    "LONG_COLUMNS",
    "SUMMARY_COLUMNS",
    "BY_QUANTILE_COLUMNS",
    "Z_TEST_COLUMNS",
    "REASONS",
]

# --- grapes_dask.stats ----------------------------------------------------------------------
GROUP_PROFILES = ("radial_layers_graylevel", "radial_layers_graylevelnormed", "radial_layers_std")
GROUP_STATS = ("mean", "std", "se", "n")  # per (group, layer): "<profile>-<stat>"
SCALAR_STATS = ("n", "mean", "std", "se", "median")  # per group: "<column>-<stat>"
POPULATION_FIELDS = ("n", "mean", "sd", "ses", "sem", "se_tot")

# --- grapes_dask.track (see the data contract in the track module) ---------------------------
LONG_COLUMNS = (
    "label", "state", "roi_mean", "roi_voxels", "roi_sem", "delta", "delta_sem", "volume",
    "centroid-0", "centroid-1", "centroid-2", "excluded", "reason",
)
SUMMARY_COLUMNS = (
    "n", "mean", "sd", "sem", "ses", "se_tot", "delta_mean", "delta_sd", "delta_sem", "delta_ses", "delta_se_tot",
)
BY_QUANTILE_COLUMNS = (
    "group", "lo", "hi", "state", "n", "delta_mean", "delta_sd", "delta_sem", "delta_ses", "delta_se_tot",
    "mean", "se_tot",
)
Z_TEST_COLUMNS = ("against", "state_a", "state_b", "n_a", "n_b", "mean_a", "mean_b", "z", "p", "critical", "reject",
                  "sigma", "testable")
REASONS = ("inconsistent", "neighbour", "border", "empty_roi", "smallest")  # order in `reason`, joined by ";"
