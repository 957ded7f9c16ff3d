"""Local parquet files are read with pyarrow, giving exactly the rows `datasets` gives."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sweep.engine.data import load_text
from sweep.errors import DataError


def test_parquet_text_equals_what_datasets_reads(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": [" = Title = \n", "", None, "body ünïcode\n"], "n": [1, 2, 3, 4]}), path)
    from datasets import load_dataset

    rows = load_dataset("parquet", data_files=str(path), split="train", cache_dir=str(tmp_path / "c"))["text"]
    assert load_text(str(path)) == "\n\n".join(r if isinstance(r, str) else "" for r in rows)


def test_parquet_without_the_text_column_names_the_columns(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"body": ["a"]}), path)
    with pytest.raises(DataError, match="no column 'text'; columns: body"):
        load_text(str(path))
