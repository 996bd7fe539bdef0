"""Read clickstream files (Parquet, CSV(.gz), JSONL(.gz)) as sharded Ray Datasets.

Paths may be a file, a directory, a glob (``logs/2026-*/*.csv.gz``) or any URI a pyarrow
filesystem understands (``s3://bucket/events/``, ``gs://...``). CSV is read with every column as
a string so one malformed value quarantines one row instead of failing a whole file; validation
parses the types.
"""

from __future__ import annotations

import fnmatch
import glob
import gzip
from pathlib import Path

import pyarrow.fs as pafs

from bundlerec.data.schema import SchemaError

_EXT = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "csv", ".jsonl": "jsonl",
        ".json": "jsonl", ".ndjson": "jsonl"}


def _format_of(path: str) -> str:
    name = path[:-3] if path.endswith(".gz") else path
    for ext, fmt in _EXT.items():
        if name.endswith(ext):
            return fmt
    raise SchemaError(f"cannot tell the format of {path!r} from its extension; set data.format")


def expand(path: str) -> list[str]:
    """Expand a path/dir/glob/URI to a sorted list of files (URIs keep their scheme)."""
    has_glob = any(ch in path for ch in "*?[")
    if "://" not in path:
        if has_glob:
            files = sorted(p for p in glob.glob(path, recursive=True) if Path(p).is_file())
        elif Path(path).is_dir():
            files = sorted(str(p) for p in Path(path).rglob("*") if p.is_file() and not p.name.startswith((".", "_")))
        elif Path(path).is_file():
            files = [path]
        else:
            files = []
        if not files:
            raise SchemaError(f"no input files found at {path!r}")
        return files
    fs, root = pafs.FileSystem.from_uri(path.split("*")[0].rsplit("/", 1)[0] if has_glob else path)
    scheme = path.split("://", 1)[0]
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File and not has_glob:
        return [path]
    sel = pafs.FileSelector(root, recursive=True, allow_not_found=True)
    pattern = path.split("://", 1)[1]
    files = [f"{scheme}://{i.path}" for i in fs.get_file_info(sel) if i.type == pafs.FileType.File
             and (not has_glob or fnmatch.fnmatch(i.path, pattern))
             and not Path(i.path).name.startswith((".", "_"))]
    if not files:
        raise SchemaError(f"no input files found at {path!r}")
    return sorted(files)


def _csv_header(path: str, delimiter: str = ",") -> list[str]:
    if "://" in path:
        fs, p = pafs.FileSystem.from_uri(path)
        f = fs.open_input_stream(p, compression="detect")
        line = f.read(65536).split(b"\n", 1)[0].decode("utf-8", errors="replace")
    else:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            line = f.readline()
    return [c.strip().strip('"') for c in line.rstrip("\r\n").split(delimiter)]


def check_parquet(files: list[str]) -> None:
    """Fail early, naming the file, on a truncated or non-Parquet file (reads footers only)."""
    import pyarrow.parquet as pq

    for f in files:
        try:
            if "://" in f:
                fs, p = pafs.FileSystem.from_uri(f)
                with fs.open_input_file(p) as fh:
                    pq.read_metadata(fh)
            else:
                pq.read_metadata(f)
        except Exception as e:
            raise SchemaError(f"{f}: not a readable Parquet file (truncated or corrupt?): {e}") from None


def check_text_encoding(files: list[str], encoding: str) -> None:
    """Fail early, naming the file and byte offset, when a local text file is not in ``encoding``."""
    import codecs

    for f in files:
        if "://" in f:
            continue  # remote files are checked by the reader itself
        dec = codecs.getincrementaldecoder(encoding)()
        offset = 0
        opener = gzip.open if f.endswith(".gz") else open
        with opener(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                try:
                    dec.decode(chunk)
                except UnicodeDecodeError as e:
                    raise SchemaError(f"{f}: not valid {encoding} at byte {offset + e.start} "
                                      f"({chunk[max(0, e.start - 20):e.end + 20]!r}); set data.encoding") from None
                offset += len(chunk)


def _columns_of(files: list[str], columns_by_file: dict) -> dict[tuple, list[str]]:
    """Headerless files grouped by the column names their glob gives them; a file no glob names is refused."""
    import fnmatch
    import os

    groups: dict[tuple, list[str]] = {}
    for f in files:
        names = [cols for glob, cols in columns_by_file.items() if fnmatch.fnmatch(os.path.basename(f), glob)]
        if not names:
            raise SchemaError(f"{f}: no data.csv_columns_by_file glob matches it ({sorted(columns_by_file)}); "
                              f"headerless files need their column names")
        groups.setdefault(tuple(names[0]), []).append(f)
    return groups


def read_dataset(path: str, fmt: str = "auto", override_num_blocks: int | None = None, encoding: str = "utf-8",
                 delimiter: str = ",", include_paths: bool = False, columns_by_file: dict | None = None):
    """Read ``path`` as a Ray Dataset, one or more blocks per file (``include_paths``: a ``path``
    column names each row's file; ``columns_by_file``: headerless CSVs, glob -> column names)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import ray.data

    files = expand(path)
    fmts = {(_format_of(f) if fmt == "auto" else fmt) for f in files}
    if len(fmts) != 1:
        raise SchemaError(f"{path!r} mixes formats {sorted(fmts)}; point at one format or set data.format")
    fmt = fmts.pop()
    kw = {"override_num_blocks": override_num_blocks} if override_num_blocks else {}
    if include_paths:
        kw["include_paths"] = True
    if fmt == "parquet":
        check_parquet(files)
        return ray.data.read_parquet(files, **kw)
    check_text_encoding(files, encoding)
    if fmt == "csv" and columns_by_file:
        parts = [ray.data.read_csv(group, read_options=pacsv.ReadOptions(encoding=encoding, column_names=list(names)),
                                   parse_options=pacsv.ParseOptions(delimiter=delimiter),
                                   convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in names},
                                                                        strings_can_be_null=True), **kw)
                 for names, group in _columns_of(files, columns_by_file).items()]
        return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    if fmt == "csv":
        header = sorted({c for f in files for c in _csv_header(f, delimiter)})  # files may differ in columns
        return ray.data.read_csv(
            files, read_options=pacsv.ReadOptions(encoding=encoding),
            parse_options=pacsv.ParseOptions(delimiter=delimiter),
            convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in header},
                                                 strings_can_be_null=True),
            **kw)
    return ray.data.read_json(files, lines=True, **kw)
