"""Records from every supported source come back identical; every unusable source is one LoramError."""

import json

import datasets
import pytest

from loram.shared import assets
from loram.shared.errors import LoramError
from loram.shared.records import load_records

# a comma, quotes, a newline, non-ASCII and a number-looking string: what CSV and JSON get wrong first
RECORDS = [
    {"question": "What is 2+2?", "answer": "42"},
    {"question": 'Say "hi", then stop', "answer": "hi\nstop"},
    {"question": "Café?", "answer": ""},
]


def write_jsonl(path, records=RECORDS):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def write_json(path):
    path.write_text(json.dumps(RECORDS), encoding="utf-8")
    return path


def write_parquet(path):
    datasets.Dataset.from_list(RECORDS).to_parquet(path)
    return path


def write_csv(path):
    datasets.Dataset.from_list(RECORDS).to_csv(path, index=False)
    return path


def write_saved(path):
    datasets.Dataset.from_list(RECORDS).save_to_disk(path)
    return path


WRITERS = {  # kind -> writer of RECORDS into a folder, returning the source to load
    "jsonl": lambda d: write_jsonl(d / "data.jsonl"),
    "json": lambda d: write_json(d / "data.json"),
    "parquet": lambda d: write_parquet(d / "data.parquet"),
    "csv": lambda d: write_csv(d / "data.csv"),
    "saved": lambda d: write_saved(d / "saved"),
}


@pytest.mark.parametrize("kind", WRITERS)
def test_every_file_type_round_trips_the_same_records(tmp_path, kind):
    path = WRITERS[kind](tmp_path)
    records = load_records(path)
    assert isinstance(records, datasets.Dataset)
    assert records.to_list() == RECORDS  # csv cells stay strings: "42" is not 42.0, "" is not None


def test_a_saved_dataset_dict_gives_the_named_split(tmp_path):
    other = [{"question": "other", "answer": "split"}]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(other),
                          "test": datasets.Dataset.from_list(RECORDS)}).save_to_disk(tmp_path / "dd")
    assert load_records(tmp_path / "dd").to_list() == other  # "train" by default
    assert load_records(str(tmp_path / "dd"), split="test").to_list() == RECORDS
    with pytest.raises(LoramError, match="no split 'validation'; choose one of train, test"):
        load_records(tmp_path / "dd", split="validation")


def test_a_built_in_name_reads_that_split(tmp_path, monkeypatch):
    seen = []
    path = write_jsonl(tmp_path / "x.jsonl")
    monkeypatch.setattr(assets, "data_path", lambda name: seen.append(name) or path)
    assert load_records("gsm8k-heldout").to_list() == RECORDS
    assert seen == ["gsm8k-heldout"]


def test_loading_is_quiet_and_leaves_datasets_settings_alone(tmp_path, capfd):
    verbosity = datasets.logging.get_verbosity()
    bars = datasets.is_progress_bar_enabled()
    path = WRITERS["csv"](tmp_path)
    capfd.readouterr()  # writing the file shows a progress bar; loading it must not
    load_records(path)
    assert capfd.readouterr().err == ""
    assert datasets.logging.get_verbosity() == verbosity and datasets.is_progress_bar_enabled() == bars


def _error(source, **kwargs) -> str:
    with pytest.raises(LoramError) as err:
        load_records(source, **kwargs)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_a_missing_file_names_it_and_the_accepted_sources(tmp_path):
    message = _error(tmp_path / "nope.jsonl")
    assert "nope.jsonl" in message and ".parquet" in message and "gsm8k-train" in message


def test_an_unsupported_extension_names_the_accepted_ones(tmp_path):
    (tmp_path / "data.txt").write_text("some text")
    message = _error(tmp_path / "data.txt")
    assert "data.txt" in message and "'.txt'" in message and ".jsonl, .json, .parquet, .csv" in message


@pytest.mark.parametrize("name, content", [("e.jsonl", ""), ("e.jsonl", "\n \n"), ("e.json", "[]"),
                                           ("e.csv", "question,answer\n")])
def test_an_empty_file_says_so(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    message = _error(tmp_path / name)
    assert name in message and "empty" in message and "at least one record" in message


def test_an_empty_saved_dataset_names_it_and_the_fix(tmp_path):
    datasets.Dataset.from_dict({"text": []}).save_to_disk(tmp_path / "empty")
    message = _error(tmp_path / "empty")  # datasets itself fails with an IndexError here
    assert str(tmp_path / "empty") in message and "empty" in message and "save it again" in message


def test_a_malformed_file_names_it_and_the_parser_reason(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"question": "ok"}\n{oops\n')
    message = _error(tmp_path / "bad.jsonl")
    assert "bad.jsonl" in message and "JSON parse error" in message and "fix the file" in message


def test_a_folder_that_is_not_a_saved_dataset_says_so(tmp_path):
    (tmp_path / "folder").mkdir()
    message = _error(tmp_path / "folder")
    assert "folder" in message and "save_to_disk" in message


@pytest.mark.slow
def test_the_built_in_gsm8k_split_has_question_answer_records():
    records = load_records("gsm8k-train")
    assert len(records) == assets.GSM8K_TRAIN_ITEMS and records.column_names == ["question", "answer"]
    assert records[0] == assets.read_records("gsm8k-train")[0]


def test_an_unreadable_text_file_is_our_one_line_alone(tmp_path, capfd, caplog):
    """The datasets JSON reader logs "Failed to load JSON from file ..." before it raises: the user gets our
    line only."""
    from loram.shared.records import iter_texts

    bad = tmp_path / "binary.jsonl"
    bad.write_bytes(b"\x00\x01\xff\xfe garbage\n")
    with pytest.raises(LoramError, match="could not read data source .*binary.jsonl"):
        list(iter_texts(str(bad)))
    captured = capfd.readouterr()
    said = captured.err + captured.out + caplog.text
    assert "Failed to load JSON" not in said, said
