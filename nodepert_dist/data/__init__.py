"""Datasets: published files (mnist, cifar), the converted store, fetch, and the Grain pipeline."""

from nodepert_dist.data.raw import DataError, Raw  # noqa: F401
from nodepert_dist.data.store import DATASETS, open_dataset  # noqa: F401
