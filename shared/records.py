"""Data from files, saved datasets and built-in splits: the one reader of the project.

- `load_records(source)`: fine-tuning and evaluation records (`loram train`, `loram eval`).
- `iter_texts(source)`: the documents of a text source, streamed (calibration and alignment text). A
  `.txt` file holds one document per paragraph (paragraphs separated by blank lines); `.jsonl`, `.json`,
  `.parquet` files and saved datasets hold one document per record, in their `text` column; the built-in
  text splits are `wiki`, `wiki-heldout` and `news`.

`load_records(source)` accepts, in this order:

- a built-in split name from `assets.DATA_NAMES` (e.g. `gsm8k-train`: {"question", "answer"} records)
- a directory written by `datasets.Dataset.save_to_disk` (or `DatasetDict.save_to_disk`: the `split`
  argument picks one, "train" by default)
- a file by extension: `.jsonl` (one JSON object per line), `.json` (a list of objects), `.parquet`,
  `.csv` (a header row; every cell is read as a string and empty cells stay "", so "42" is not
  turned into a number)

Files are read with the `datasets` library, so they land in its Arrow cache (`HF_DATASETS_CACHE`) and
large files are memory-mapped rather than held in RAM. Its progress bars and log lines are silenced
while loading: anything that goes wrong comes back as one `LoramError` naming the file and the fix.
"""

import contextlib
import csv
import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from loram.shared import assets
from loram.shared.errors import LoramError

if TYPE_CHECKING:  # imported where used: `datasets` (and pyarrow) cost ~100 MiB and a second to import
    import datasets

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
TEXT_SPLITS = ("wiki", "wiki-heldout", "news")
TEXT_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
SEPARATOR = "\n\n"  # between documents when text is concatenated (calibration blocks, alignment packing)


def load_records(source: str | Path, split: str = "train") -> "datasets.Dataset":
    """The records of `source` (see the module docstring) as a `datasets.Dataset`, never empty."""
    path = assets.data_path(str(source)) if str(source) in assets.DATA_NAMES else Path(source).expanduser()
    if path.is_dir():
        records = _load_saved(path, split)
    elif path.is_file():
        records = _load_file(path)
    else:
        raise LoramError(f"data source {str(source)!r} does not exist and is not a built-in split; "
                         f"give a .jsonl/.json/.parquet/.csv file, a folder saved with "
                         f"Dataset.save_to_disk, or one of {', '.join(assets.DATA_NAMES)}")
    if len(records) == 0:
        raise LoramError(f"data source {path} holds no records; point to a file with at least one record")
    return records


def _load_saved(path: Path, split: str) -> "datasets.Dataset":
    import datasets

    try:
        with quiet_datasets():
            saved = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise LoramError(f"directory {path} is not a dataset saved with Dataset.save_to_disk; point to "
                         f"such a folder, or to a .jsonl/.json/.parquet/.csv file") from e
    except Exception as e:  # datasets fails on an empty saved dataset with an IndexError, among others
        raise LoramError(f"could not read the saved dataset {path} ({_reason(e)}); it may be empty or "
                         f"written by another version of datasets: save it again with "
                         f"Dataset.save_to_disk") from e
    if isinstance(saved, datasets.DatasetDict):
        if split not in saved:
            raise LoramError(f"saved dataset {path} has no split {split!r}; choose one of "
                             f"{', '.join(saved.keys())}")
        return saved[split]
    return saved


def _load_file(path: Path) -> "datasets.Dataset":
    import datasets

    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise LoramError(f"data file {path} has an unsupported extension {path.suffix or '(none)'!r}; "
                         f"convert it to one of {', '.join(BUILDERS)} or save it with Dataset.save_to_disk")
    if not _has_content(path) or (builder == "csv" and not _csv_header(path)):
        raise LoramError(f"data file {path} is empty; point to a file with at least one record")
    options = {}
    if builder == "csv":  # all cells as strings: an answer "42" must not become the number 42.0
        strings = datasets.Features({name: datasets.Value("string") for name in _csv_header(path)})
        options = dict(keep_default_na=False, features=strings)
    try:
        with quiet_datasets():
            return datasets.load_dataset(builder, data_files=str(path), split="train", **options)
    except Exception as e:  # the datasets builders raise many types; all mean "this file is unreadable"
        if "corresponds to no data" in str(e):  # a csv with a header and no rows
            raise LoramError(f"data file {path} is empty; point to a file with at least one record") from e
        raise LoramError(f"could not read {path} as {path.suffix.lstrip('.')} ({_reason(e)}); fix the file "
                         f"or convert it to one of {', '.join(BUILDERS)}") from e


def _has_content(path: Path, chunk: int = 1 << 16) -> bool:
    """Whether the file holds anything but whitespace (reads only until the first non-blank byte)."""
    with open(path, "rb") as f:
        while block := f.read(chunk):
            if block.strip():
                return True
    return False


def _csv_header(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8") as f:
        return next(csv.reader(f), [])


def _reason(error: BaseException) -> str:
    """The innermost cause of a datasets error, on one line (its outer message is generic)."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


@contextlib.contextmanager
def quiet_datasets():
    """Silence the datasets library's progress bars and log lines, restoring both afterwards."""
    import datasets

    verbosity = datasets.logging.get_verbosity()
    bars = datasets.is_progress_bar_enabled()
    datasets.logging.set_verbosity(logging.CRITICAL)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


def check_source(name: str, also: tuple[str, ...] = ()) -> None:
    """Refuse a source that is neither a built-in split, a supported file nor a saved dataset folder; `also`:
    more built-in names the caller reads itself (named in the error)."""
    if name in TEXT_SPLITS:
        return
    path = Path(name).expanduser()
    if path.is_dir():
        return
    if not path.is_file():
        raise LoramError(f"data source {name!r} is neither a file, a saved dataset folder nor a built-in "
                         f"name ({', '.join((*TEXT_SPLITS, *also))})")
    if path.suffix.lower() not in TEXT_BUILDERS:
        raise LoramError(f"data source {path} must be {', '.join(TEXT_BUILDERS)} or a folder saved with "
                         "Dataset.save_to_disk")


def _text_dataset(name: str):
    """The source's records, streamed: a `datasets.IterableDataset` (of a memory-mapped saved dataset, or of a
    file) read with the datasets library quiet (`_quietly`); a built-in split is read line by line as the JSON
    lines file it is, without the datasets library."""
    if name in TEXT_SPLITS:
        return _json_lines(assets.data_path(name))
    import datasets

    check_source(name)
    path = Path(name).expanduser()
    with quiet_datasets():
        if path.is_dir():
            try:
                saved = datasets.load_from_disk(str(path))
            except Exception as e:  # FileNotFoundError for a plain folder; others for a broken one
                raise LoramError(f"folder {path} is not a dataset saved with Dataset.save_to_disk") from e
            if isinstance(saved, datasets.DatasetDict):
                if "train" not in saved:
                    raise LoramError(f"saved dataset {path} has no 'train' split (it has {', '.join(saved)})")
                saved = saved["train"]
            return _quietly(saved.to_iterable_dataset())
        if not _has_content(path):  # the streaming readers fail on it with a bare StopIteration
            raise LoramError(_no_text(name))
        builder = TEXT_BUILDERS[path.suffix.lower()]
        options = {"sample_by": "paragraph"} if builder == "text" else {}
        return _quietly(datasets.load_dataset(builder, data_files=str(path), split="train", streaming=True,
                                              **options))


def _no_text(name: str) -> str:
    return f"data source {name} holds no text records; give a file with at least one non-empty 'text' record"


def _json_lines(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _quietly(records: Iterable) -> Iterator:
    """`records`, read with the datasets library quiet (its JSON reader logs a file it cannot parse before
    raising; the error is ours to say, in one line). Quiet from the first record to the last."""
    with quiet_datasets():
        yield from records


def iter_texts(name: str) -> Iterator[str]:
    """The documents of a source, in order, streamed; a source without any non-blank text is a LoramError."""
    found = False
    try:
        for record in _text_dataset(name):
            text = record.get("text")
            if not isinstance(text, str):
                found_here = (f"a record's 'text' is {type(text).__name__}" if "text" in record
                              else f"found {', '.join(record) or 'no fields'}")
                raise LoramError(f"data source {name}: every record needs a string field 'text' ({found_here})")
            if text.strip():
                found = True
                yield text
        if not found:
            raise LoramError(_no_text(name))
    except LoramError:
        raise
    except Exception as e:  # the datasets readers raise many types; all mean "this file is unreadable"
        raise LoramError(f"could not read data source {name} ({type(e).__name__}: {e})") from e
