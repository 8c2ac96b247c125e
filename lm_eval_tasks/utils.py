"""Loaders for the offline tasks: the JSONL files sit next to this file, whatever the working directory."""

from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def load_jsonl(data_file: str, **kwargs) -> datasets.DatasetDict:
    """A `test` split from a JSONL file in this folder (`dataset_kwargs: {data_file: ...}` in the task YAML)."""
    return datasets.load_dataset("json", data_files={"test": str(HERE / data_file)})
