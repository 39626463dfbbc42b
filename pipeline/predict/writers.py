"""Prediction output: one table row per input, appended batch by batch as CSV, JSON Lines or Parquet."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
import pandas as pd

from pipeline.errors import PipelineError

OUTPUT_FORMATS = {".csv": "csv", ".parquet": "parquet", ".jsonl": "jsonl"}
# Rows per Parquet row group: readers handle a few large groups far better than thousands
# of batch-sized ones, and 64k rows of results is still only a few MB of memory.
PARQUET_ROW_GROUP = 65_536


@dataclass
class Batch:
    """Up to batch_size rows in input order; the rows without an error have an image in `images`."""

    images: np.ndarray  # float32 (n_ok, 1, H, W), a view of a buffer reused by the next batch
    sources: list[str] = field(default_factory=list)
    indices: list[int | None] = field(default_factory=list)
    errors: list[str | None] = field(default_factory=list)
    notes: list[str | None] = field(default_factory=list)  # what preprocessing did, per row
    originals: list = field(default_factory=list)  # decoded image files kept for a contact sheet, else None


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=1, keepdims=True)
    return shifted


def result_columns(top_k: int) -> list[str]:
    columns = ["source", "index", "predicted_id", "predicted_class", "confidence"]
    for k in range(1, top_k + 1):
        columns += [f"top{k}_class", f"top{k}_prob"]
    return columns + ["preprocessing", "error"]


def printable_path(source: str) -> str:
    """A file name as every output format can hold it.

    Names that aren't valid UTF-8 reach Python with their bad bytes as lone surrogates, which no
    UTF-8 writer accepts; they are written as backslash escapes instead (b'bad\\xffname.png').
    """
    return source.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def batch_table(
    batch: Batch, logits: np.ndarray, class_names: list[str], top_k: int, temperature: float = 1.0
) -> pd.DataFrame:
    """One row per input of the batch; prediction columns are empty where the row has an error.

    Probabilities are softmax(logits / temperature): the model's calibration (onnx_contract.TEMPERATURE_KEY).
    """
    rows = len(batch.sources)
    ok = np.array([e is None for e in batch.errors], dtype=bool)
    scaled = logits.astype(np.float32, copy=True)
    if temperature != 1.0:
        scaled /= np.float32(temperature)
    probs = softmax(scaled)
    order = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
    names = np.asarray(class_names, dtype=object)

    def spread(values: np.ndarray, fill) -> np.ndarray:
        out = np.full(rows, fill, dtype=object if fill is None else values.dtype)
        out[ok] = values
        return out

    missing = ~ok
    table = {
        "source": [printable_path(source) for source in batch.sources],
        "index": pd.array(batch.indices, dtype="Int64"),
        "predicted_id": pd.arrays.IntegerArray(spread(order[:, 0].astype(np.int64), 0), missing),
        "predicted_class": spread(names[order[:, 0]], None),
        "confidence": spread(np.take_along_axis(probs, order[:, :1], 1)[:, 0], np.nan),
    }
    for k in range(top_k):
        table[f"top{k + 1}_class"] = spread(names[order[:, k]], None)
        table[f"top{k + 1}_prob"] = spread(np.take_along_axis(probs, order[:, k : k + 1], 1)[:, 0], np.nan)
    table["preprocessing"] = batch.notes
    table["error"] = batch.errors
    return pd.DataFrame(table)


class TableWriter:
    """Appends batch tables to CSV, JSON Lines or Parquet."""

    def __init__(self, stream: IO, fmt: str, top_k: int):
        self.stream, self.fmt, self.first = stream, fmt, True
        self.columns = result_columns(top_k)
        self.parquet = None
        self.pending: list = []  # Parquet: batch tables gathered into one row group
        self.pending_rows = 0
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            fields = [("source", pa.string()), ("index", pa.int64()), ("predicted_id", pa.int64())]
            fields += [("predicted_class", pa.string()), ("confidence", pa.float32())]
            for k in range(1, top_k + 1):
                fields += [(f"top{k}_class", pa.string()), (f"top{k}_prob", pa.float32())]
            # A fixed schema: a first batch of only errors must not decide the column types.
            self.schema = pa.schema([*fields, ("preprocessing", pa.string()), ("error", pa.string())])
            self.parquet = pq.ParquetWriter(stream, self.schema)

    def write(self, table: pd.DataFrame) -> None:
        if self.fmt == "csv":
            table.to_csv(self.stream, header=self.first, index=False, float_format="%.6g", lineterminator="\n")
        elif self.fmt == "jsonl":
            # json.dumps, not DataFrame.to_json, which escapes the "/" in "T-shirt/top".
            lines = []
            for record in table.to_dict("records"):
                clean = {k: json_value(v) for k, v in record.items()}
                lines.append(json.dumps(clean, ensure_ascii=False))
            self.stream.write("\n".join(lines) + "\n")
        else:
            import pyarrow as pa

            self.pending.append(pa.Table.from_pandas(table, schema=self.schema, preserve_index=False))
            self.pending_rows += len(table)
            if self.pending_rows >= PARQUET_ROW_GROUP:
                self.flush_row_group()
        self.first = False

    def flush_row_group(self) -> None:
        import pyarrow as pa

        if self.pending:
            self.parquet.write_table(pa.concat_tables(self.pending))
        self.pending, self.pending_rows = [], 0

    def abort(self) -> None:
        """After a failure: release the Parquet writer now, not in __del__ after its file is closed."""
        if self.parquet is not None:
            self.parquet.close()
            self.parquet = None

    def close(self) -> None:
        if self.parquet is not None:
            self.flush_row_group()
            self.parquet.close()
        elif self.first and self.fmt == "csv":  # no rows at all: still a valid CSV with its header
            self.stream.write(",".join(self.columns) + "\n")


def json_value(value):
    if value is None or value is pd.NA:
        return None
    if isinstance(value, float | np.floating):
        return None if np.isnan(value) else round(float(value), 6)
    if isinstance(value, np.integer):
        return int(value)
    return value


def output_format(output: Path | None) -> str:
    if output is None:
        return "csv"
    fmt = OUTPUT_FORMATS.get(output.suffix.lower())
    if fmt is None:
        raise PipelineError(f"--output {output}: unknown format; name it .csv, .parquet or .jsonl")
    if not output.parent.is_dir():
        raise PipelineError(f"--output {output}: folder {output.parent} does not exist")
    return fmt
