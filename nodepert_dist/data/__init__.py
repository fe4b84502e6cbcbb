"""Datasets: files on disk (sources) and the Grain input pipeline (pipeline)."""

from nodepert_dist.data.sources import DATASETS, Arrays, DataError, fetch, load  # noqa: F401
