"""Data: sources, normalisation and source/target tasks, client partitions, partition summary."""

from fedrac.data import lazy_imports  # noqa: F401 - first: defers flwr_datasets' plots
from fedrac.data.load import (
    DATASETS,
    Task,
    build_task,
    load_dataset_from_path,
    load_task,
    partition,
    plain,
    source_stamp,
    to_dataset,
    to_tensors,
)
from fedrac.data.partitioners import PARTITIONERS, build_partitioner
from fedrac.data.sources import DataConfigError

__all__ = ["DATASETS", "PARTITIONERS", "DataConfigError", "Task", "build_partitioner",
           "build_task", "load_dataset_from_path", "load_task", "partition", "plain",
           "source_stamp", "to_dataset", "to_tensors"]
