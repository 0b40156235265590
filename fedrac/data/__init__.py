"""Data: sources, text tokenisation, normalisation and source/target splits, client partitions,
partition summary."""

from fedrac.data import lazy_imports  # noqa: F401 - first: defers flwr_datasets' plots
from fedrac.data.load import (
    DATASETS,
    DataSplits,
    build_splits,
    load_dataset_from_path,
    load_splits,
    plain,
    source_stamp,
    to_dataset,
    to_tensors,
)
from fedrac.data.partitioners import PARTITIONERS, build_partitioner, partition
from fedrac.data.sources import DataConfigError

__all__ = ["DATASETS", "PARTITIONERS", "DataConfigError", "DataSplits", "build_partitioner",
           "build_splits", "load_dataset_from_path", "load_splits", "partition", "plain",
           "source_stamp", "to_dataset", "to_tensors"]
