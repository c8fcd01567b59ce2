"""Offline batch explanation on Ray Data: a folder (or any path Ray reads) in, Parquet out.

The model loads once per worker (a callable class in `map_batches`); the number of workers and the batch
size are options. On a laptop a local Ray instance is started for the run, listening on loopback alone
(`fastattr.localray`); `address=` joins a cluster.

>>> failed = fastattr.raydata.explain_to_parquet("photos/", "out/explained", Spec(k=3), workers=2)  # doctest: +SKIP

Files are read as bytes (`ray.data.read_binary_files`) and decoded by fastattr rather than by
`ray.data.read_images`, which fails the whole run on one corrupt file: here an unreadable file is
reported, and skipped, and the rest is explained.

The Parquet holds one row per image, in plain Arrow types (`to_arrow`), so that pyarrow, pandas,
DuckDB or Spark read it without Ray:

    path            string          the file the row explains
    classes         list<int64>     the K classes explained, best first
    names           list<string>    their names ("" for a model without class names)
    probabilities   list<float>     the softmax of the logits at those classes
    shape           list<int32>     [K, H, W]: the shape of each map column's value
    map_<method>    list<uint8>     that method's K maps, round(map * 255), row-major (a quarter of float32's size)

>>> frame = pyarrow.parquet.read_table("out/explained").to_pandas()                        # doctest: +SKIP
>>> row = frame.iloc[0]                                                                     # doctest: +SKIP
>>> gradcam = np.asarray(row.map_gradcam).reshape(row.shape) / 255                         # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import images as _images
from .pipeline import Spec, build, check
from .options import spec_from_args
from .errors import InputError
from .localray import init_local_ray

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["ExplainBatch", "ExplainBatchToArrow", "explain_to_parquet", "to_arrow"]


class ExplainBatch:
    """The `map_batches` callable: built once per worker from a `Spec`, then `{"path", "bytes"}` batches to result
    rows. Rows of unreadable files carry their `error` and empty results, so the caller can report and drop them."""

    def __init__(self, spec: Spec):
        self.pipeline = build(spec)
        self.size, self.k, self.methods = self.pipeline.input_size, self.pipeline.k, self.pipeline.methods
        self.names = self.pipeline.names or ()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        decoded, errors = [], []
        for path, data in zip(batch["path"], batch["bytes"]):
            try:
                decoded.append(_images.decode(data, self.size))
                errors.append("")
            except InputError as exc:
                decoded.append(None)
                errors.append(f"{path!r}: {str(exc).split(': ', 1)[-1]}")
        good = [i for i, image in enumerate(decoded) if image is not None]
        n, k = len(decoded), self.k
        classes = np.full((n, k), -1, dtype=np.int64)
        probabilities = np.zeros((n, k), dtype=np.float32)
        maps = {m: np.zeros((n, k, self.size, self.size), dtype=np.uint8) for m in self.methods}
        if good:
            out = self.pipeline(_images.normalize(torch.stack([decoded[i] for i in good]), self.pipeline.mean,
                                                  self.pipeline.std)).cpu()
            classes[good] = out.classes.numpy()
            probabilities[good] = out.logits.float().softmax(-1).gather(1, out.classes).numpy()
            for m in self.methods:
                maps[m][good] = (out.maps[m].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        names = np.array([[self.names[c] if 0 <= c < len(self.names) else "" for c in row] for row in classes])
        return {"path": np.asarray(batch["path"]), "error": np.array(errors), "classes": classes, "names": names,
                "probabilities": probabilities, **{f"map_{m}": v for m, v in maps.items()}}


def to_arrow(rows: dict[str, np.ndarray]) -> pa.Table:
    """`ExplainBatch` rows as an Arrow table of plain types, the Parquet schema (the module's docstring): each
    `[N, K, ...]` array a list column, the maps flattened row-major beside their shape, the names as strings.
    Ray's own conversion would write the maps in its tensor extension type and the names as fixed-width UTF-32
    bytes, which pyarrow and pandas cannot read back without Ray."""
    import pyarrow as pa

    maps = {column: values for column, values in rows.items() if column.startswith("map_")}
    n, k, height, width = next(iter(maps.values())).shape

    def lists(values: np.ndarray, type_: pa.DataType) -> pa.ListArray:
        flat = np.ascontiguousarray(values).reshape(-1)
        offsets = np.arange(n + 1, dtype=np.int32) * (flat.size // n if n else 0)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=type_))

    columns = {"path": pa.array(rows["path"].tolist(), pa.string()),
               "error": pa.array(rows["error"].tolist(), pa.string()),
               "classes": lists(rows["classes"], pa.int64()),
               "names": pa.array(rows["names"].tolist(), pa.list_(pa.string())),
               "probabilities": lists(rows["probabilities"], pa.float32()),
               "shape": lists(np.tile(np.array([k, height, width], dtype=np.int32), (n, 1)), pa.int32()),
               **{column: lists(values, pa.uint8()) for column, values in maps.items()}}
    return pa.table(columns)


class ExplainBatchToArrow(ExplainBatch):
    """`ExplainBatch` with its rows as `to_arrow`'s table: what the Ray Data job runs, so that the Parquet it
    writes has that table's plain types."""

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        return to_arrow(super().__call__(batch))


def explain_to_parquet(paths: str | Sequence[str], out: str | Path, spec: Spec | None = None, *, workers: int = 1,
                       batch_size: int = 16, address: str | None = None, **options) -> list[str]:
    """Explain every file under `paths` on Ray Data with what `spec` builds (or a spec of `options`: model,
    weights, layer, methods, k, ...), and write Parquet to the folder `out`. Returns the reasons of the files
    that were not readable images (those have no row).

    A spec that exports on the fly (backend onnx or pt2 of a named model) is checked here and built by each
    worker; any other is built here first, so that a bad one fails before Ray starts. Local paths are listed as
    `fastattr explain` lists them (folders: files with an image suffix); a URI (`s3://...`) goes to Ray as it is."""
    import ray

    if spec is None:
        spec = spec_from_args(options)
    elif options:
        raise InputError(f"explain_to_parquet: pass a spec or its options ({', '.join(options)}), not both")
    if spec.threshold is not None:  # each Parquet row holds k classes: a column's shape is fixed
        raise InputError("threshold: Ray Data's rows hold k classes each; explain every class above a threshold with "
                         "fastattr explain (without --ray)")
    if spec.export_file is None and spec.backend in ("onnx", "pt2"):
        check(spec)
    else:
        build(spec)
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not any("://" in str(p) for p in paths):
        paths = [str(p) for p in _images.find(paths)[0]]
        if not paths:
            raise InputError("paths: no image files found")

    started = not ray.is_initialized()
    if started and address is None:
        # Each worker holds a CPU for its whole life, so a local instance gets one more for the reading tasks:
        # with as many workers as cores, reading would otherwise wait for ever.
        init_local_ray(max(os.cpu_count() or 1, workers + 1), log_to_driver=False)
    elif started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        files = ray.data.read_binary_files(paths, include_paths=True)
        explained = files.map_batches(
            ExplainBatchToArrow, batch_size=batch_size, concurrency=workers, batch_format="numpy",
            num_gpus=1 if spec.device == "cuda" else 0,
            fn_constructor_kwargs=dict(spec=spec)).materialize()
        from ray.data.expressions import col

        failed = [row["error"] for row in explained.filter(expr=col("error") != "").iter_rows()]
        explained.filter(expr=col("error") == "").drop_columns(["error"]).write_parquet(str(out))
        return failed
    finally:
        if started:
            ray.shutdown()
