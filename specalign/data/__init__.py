"""Datasets: the reference derived layout, raw DSEC, and the API every later stage reads data through."""

from specalign.data.dataset import Dataset, Sample, open_dataset

__all__ = ["Dataset", "Sample", "open_dataset"]
