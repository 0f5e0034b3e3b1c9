"""The pruning manifest: what was pruned, from which base model, how (docs/format.md, The manifest).

Two files travel with the pruned checkpoint:
- `loram_manifest.json`, human-readable: format and tool versions, the base model (id, revision,
  fingerprint), its original architecture, the method, the kept counts of each pruned layer, the
  sha256 of every checkpoint file and of the tensors file, and the alignment records.
- `loram_manifest.safetensors`, the index tensors (too large for comfortable JSON):
  `layers.{i}.kept_kv_heads` / `layers.{i}.kept_mlp_channels` (int64, sorted, unique) for structured
  pruning, `masks.{module}` (uint8, bit-packed) for non-structured pruning.

Only the kept KV-head and MLP-channel indices are stored; query heads and weight rows/columns are
derived (`Manifest.kept_indices`). JSON is written with sorted keys and fixed indentation, so equal
manifests are equal bytes.
"""

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from loram.shared.architectures import PRUNED_MODULES, Shape, kept_index, layer_module
from loram.shared.errors import LoramError, first_line
from loram.shared.outputs import atomic_file

__all__ = ["FORMAT_VERSION", "MANIFEST_JSON", "MANIFEST_TENSORS", "BaseModelInfo", "Calibration", "Manifest",
           "Method", "PackedMask", "checkpoint_hashes", "fingerprint", "pack_mask", "unpack_mask", "verify_files",
           "verify_hashes", "visible_file_hashes"]

FORMAT_VERSION = 1
MANIFEST_JSON = "loram_manifest.json"
MANIFEST_TENSORS = "loram_manifest.safetensors"
KINDS = ("structured", "non-structured")
# Documentation the Hub lets anyone edit is not part of what `files` guarantees.
_NOT_HASHED = {MANIFEST_JSON, MANIFEST_TENSORS, "README.md"}
# What to do about a checkpoint that fails its checks (appended to the error).
REFETCH = ("re-download it (`loram pull`, or the command with its Hub id) or re-create it with "
           "`loram publish prune`")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks (the one hashing helper of the project: integrity lives here)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bool mask of any shape -> uint8 [ceil(numel / 8)], 8 entries per byte (row-major, MSB first)."""
    return torch.from_numpy(np.packbits(mask.detach().cpu().reshape(-1).numpy().astype(bool)))


def unpack_mask(packed: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of `pack_mask`: uint8 [ceil(numel / 8)] -> bool tensor of `shape`."""
    numel = math.prod(shape)
    bits = np.unpackbits(packed.cpu().numpy(), count=numel)
    return torch.from_numpy(bits.astype(bool)).reshape(tuple(shape))


@dataclass
class PackedMask:
    """A non-structured mask (True = weight kept), stored 8 entries per byte."""

    bits: torch.Tensor  # uint8 [ceil(numel / 8)]
    shape: tuple[int, ...]  # the weight's shape, e.g. (out, in)

    @classmethod
    def of(cls, mask: torch.Tensor) -> "PackedMask":
        return cls(pack_mask(mask), tuple(mask.shape))

    def unpack(self) -> torch.Tensor:
        return unpack_mask(self.bits, self.shape)

    @property
    def kept(self) -> int:
        """Number of weights kept (True in the mask)."""
        return int(np.unpackbits(self.bits.cpu().numpy(), count=math.prod(self.shape)).sum())

    @property
    def sparsity(self) -> float:
        """Fraction of weights pruned (False in the mask)."""
        return round(1 - self.kept / math.prod(self.shape), 6)


@dataclass
class Calibration:
    source: str | None = None  # file or built-in corpus name
    samples: int | None = None
    seq_len: int | None = None


@dataclass
class Method:
    kind: str  # "structured" or "non-structured"
    criterion: str  # e.g. "taylor", "random", "wanda"
    ratio: float | None = None
    attn_ratio: float | None = None
    mlp_ratio: float | None = None
    layers: list[int] | None = None  # half-open [start, stop)
    nm: list[int] | None = None  # [N, M]: N of every M consecutive input weights pruned
    sparsity: float | None = None
    calibration: Calibration = field(default_factory=Calibration)
    seed: int | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise LoramError(f"manifest method kind {self.kind!r} must be one of {', '.join(KINDS)}")
        if isinstance(self.calibration, dict):
            self.calibration = Calibration(**self.calibration)
        self.layers = None if self.layers is None else [int(x) for x in self.layers]
        self.nm = None if self.nm is None else [int(x) for x in self.nm]


@dataclass
class BaseModelInfo:
    id: str  # Hub repository id or local path
    revision: str | None = None  # commit sha when known
    fingerprint: dict[str, str] = field(default_factory=dict)  # file name -> sha256 (see `fingerprint`)


def _tool_version() -> str:
    try:
        return metadata.version("loram")
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass
class Manifest:
    """A pruning plan and its provenance. Index tensors are 1-D int64; masks are bit-packed."""

    base: BaseModelInfo
    architecture: Shape  # the original (unpruned) model
    method: Method
    kept_kv_heads: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> sorted kept KV groups
    kept_mlp_channels: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> sorted kept channels
    masks: dict[str, PackedMask] = field(default_factory=dict)  # module name -> kept-weight mask
    files: dict[str, str] = field(default_factory=dict)  # checkpoint file -> sha256
    alignment: list[dict] = field(default_factory=list)
    tool_version: str = field(default_factory=_tool_version)
    format_version: int = FORMAT_VERSION

    @property
    def pruned_layers(self) -> list[int]:
        return sorted(set(self.kept_kv_heads) | set(self.kept_mlp_channels))

    @property
    def masked_layers(self) -> list[int]:
        """Decoder layers holding non-structured masks (validated names: every one is a layer's projection)."""
        return sorted({found[0] for name in self.masks if (found := layer_module(name))})

    def kept_counts(self) -> dict[int, tuple[int, int]]:
        """layer -> (kept KV heads, kept MLP channels), the `kept` argument of `build_pruned_config`."""
        a = self.architecture
        return {i: (len(self.kept_kv_heads.get(i, range(a.num_kv_heads))),
                    len(self.kept_mlp_channels.get(i, range(a.intermediate)))) for i in self.pruned_layers}

    def kept_indices(self, layer: int, module_path: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(kept rows, kept columns) of `W[out, in]` of `module_path` (a `PRUNED_MODULES` path) in `layer`.

        None on a side that is not pruned. KV group g keeps query heads g*G .. g*G+G-1; head h keeps
        rows (or columns) h*hd .. h*hd+hd-1 (hd = head_dim); MLP channel c is row (or column) c.
        """
        module = next((m for m in PRUNED_MODULES if m.path == module_path), None)
        if module is None:
            raise LoramError(f"unknown module {module_path!r}; known: {', '.join(m.path for m in PRUNED_MODULES)}")
        kv, mlp = self.kept_kv_heads.get(layer), self.kept_mlp_channels.get(layer)
        if (kv if module.group == "attn" else mlp) is None:  # this group of the layer is dense
            return None, None
        kept = kept_index(self.architecture, module, kv, mlp)
        return (kept, None) if module.axis == "out" else (None, kept)

    def validate(self, config=None) -> None:
        """Raise LoramError naming the layer and the problem; with `config`, check it matches the plan."""
        _check_plan(self)
        if config is not None:
            _check_config(self, config)

    def check_base(self, model_dir: str | Path) -> None:
        """Refuse a base model whose config or weights differ from the one this plan was made on."""
        wrong = fingerprint_mismatches(self.base.fingerprint, model_dir)
        if wrong:
            made_from = self.base.id + (f"@{self.base.revision}" if self.base.revision else "")
            raise LoramError(f"{model_dir} is not the base model this pruned checkpoint was made from "
                             f"({made_from}): {' and '.join(wrong)} "
                             f"{'differ or are' if len(wrong) > 1 else 'differs or is'} missing")

    def save(self, out_dir: str | Path, rehash: bool = True) -> Path:
        """Write both manifest files into `out_dir`; with `rehash`, first record the hash of every checkpoint file."""
        out = Path(out_dir)
        self.validate()
        if rehash:
            self.files = checkpoint_hashes(out)
        tensors = {f"layers.{i}.kept_kv_heads": t.to(torch.int64).contiguous() for i, t in self.kept_kv_heads.items()}
        tensors |= {f"layers.{i}.kept_mlp_channels": t.to(torch.int64).contiguous()
                    for i, t in self.kept_mlp_channels.items()}
        tensors |= {f"masks.{name}": m.bits.contiguous() for name, m in self.masks.items()}
        with atomic_file(out / MANIFEST_TENSORS) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
        with atomic_file(out / MANIFEST_JSON) as tmp:
            tmp.write_text(_dumps(self._json(sha256_file(out / MANIFEST_TENSORS))), encoding="utf-8")
        return out / MANIFEST_JSON

    def _json(self, tensors_sha: str) -> dict:
        layers = [{"layer": i, "kept_kv_heads": c[0], "kept_mlp_channels": c[1]} for i, c in self.kept_counts().items()]
        return {
            "format_version": self.format_version, "tool_version": self.tool_version,
            "base": asdict(self.base), "architecture": asdict(self.architecture), "method": asdict(self.method),
            "pruned_layers": layers,
            "masks": {name: {"shape": list(m.shape), "sparsity": m.sparsity} for name, m in sorted(self.masks.items())},
            "tensors": {"file": MANIFEST_TENSORS, "sha256": tensors_sha},
            "files": dict(sorted(self.files.items())), "alignment": self.alignment,
        }

    @classmethod
    def load(cls, model_dir: str | Path, config=None, fix: str | None = None) -> "Manifest":
        """Read and validate the manifest of `model_dir` (and, given `config`, its consistency with it).

        Every problem is one LoramError naming the manifest file and the layer or field, then `fix`
        (what to do about it) when given."""
        root = Path(model_dir)
        try:
            manifest = _read(root)
            try:
                _check_plan(manifest)
            except LoramError as e:
                raise LoramError(f"{root / MANIFEST_JSON}: {e}") from e
        except LoramError as e:
            raise (LoramError(f"{e}; {fix}") if fix else e) from e.__cause__
        if config is not None:
            manifest.check_config(config, root, fix)
        return manifest

    def check_config(self, config, model_dir: str | Path, fix: str | None = None) -> None:
        """Refuse a `config.json` (of `model_dir`) whose sizes disagree with this manifest: one LoramError
        naming the layer, then `fix` when given."""
        try:
            _check_config(self, config)
        except LoramError as e:
            raise LoramError(f"{Path(model_dir) / MANIFEST_JSON} does not match config.json: {e}"
                             + (f"; {fix}" if fix else "")) from e


def _dumps(data: dict) -> str:
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def checkpoint_hashes(model_dir: str | Path) -> dict[str, str]:
    """sha256 of every checkpoint file under `model_dir` (relative POSIX paths), except hidden files,
    the manifest itself and the model card."""
    return visible_file_hashes(model_dir, skip=_NOT_HASHED)


def visible_file_hashes(root: str | Path, skip=()) -> dict[str, str]:
    """sha256 of every file under `root` by relative POSIX path, in order, except hidden files (a name or folder
    starting with '.') and the names in `skip`."""
    root = Path(root)
    names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    return {n: sha256_file(root / n) for n in names
            if n not in skip and not any(part.startswith(".") for part in n.split("/"))}


def fingerprint(model_dir: str | Path, names=None) -> dict[str, str]:
    """sha256 of `config.json` and of each weight file of a model folder (safetensors if any, else .bin).

    In a Hugging Face cache snapshot each weight file links to a blob named by its sha256 (Git LFS),
    so that name is used instead of re-reading tens of GB; other files are hashed.
    """
    root = Path(model_dir)
    if names is None:
        if not (root / "config.json").is_file():
            raise LoramError(f"{root} has no config.json; is it a model folder?")
        weights = sorted(p.name for p in root.glob("*.safetensors") if p.name != MANIFEST_TENSORS)
        names = ["config.json", *(weights or sorted(p.name for p in root.glob("*.bin")))]
    return {n: _blob_sha256(root / n) for n in sorted(names) if (root / n).is_file()}


def fingerprint_mismatches(expected: dict[str, str], model_dir: str | Path) -> list[str]:
    """The files of `expected` (name -> sha256) that `model_dir` lacks or holds with other content."""
    if not expected:
        return []
    actual = fingerprint(model_dir, names=expected)
    return [n for n in sorted(expected) if actual.get(n) != expected[n]]


def _blob_sha256(path: Path) -> str:
    """A cache snapshot's file links (one hop) to `blobs/<sha256>` for LFS files; use that name. Further
    hops (shared Xet storage) are named by other hashes, so only the first link counts."""
    if path.is_symlink():
        name = Path(os.readlink(path)).name
        if len(name) == 64 and all(c in "0123456789abcdef" for c in name):
            return name
    return sha256_file(path)


def _no_manifest(root: Path) -> LoramError:
    if not root.exists():
        return LoramError(f"{root} does not exist; give a LoRAM pruned checkpoint folder")
    return LoramError(f"{root} has no {MANIFEST_JSON}; is it a LoRAM pruned checkpoint?")


def verify_files(model_dir: str | Path, fix: str = REFETCH) -> None:
    """Recompute the sha256 of every file the manifest lists; LoramError naming the first that differs."""
    root = Path(model_dir)
    path = root / MANIFEST_JSON
    if not path.is_file():
        raise _no_manifest(root)
    data = json.loads(path.read_text(encoding="utf-8"))
    verify_hashes(root, {**data.get("files", {}), MANIFEST_TENSORS: data.get("tensors", {}).get("sha256")}, fix)


def verify_hashes(root: Path, listed: dict[str, str], fix: str = REFETCH) -> None:
    """Stream-hash each file of `listed` (name -> sha256) under `root`; LoramError naming the first that
    is missing or differs, with `fix` (what to do about it) appended."""
    for name, expected in sorted(listed.items()):
        if not (root / name).is_file():
            raise LoramError(f"{name}: listed in the manifest but missing from {root}; {fix}")
        if sha256_file(root / name) != expected:
            raise LoramError(f"{root / name}: sha256 does not match the manifest; the file is corrupted or was "
                             f"modified: {fix}")


def _read(root: Path) -> Manifest:
    """Parse both files; the tensors file must match the sha256 the JSON recorded for it."""
    path = root / MANIFEST_JSON
    if not path.is_file():
        raise _no_manifest(root)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data["format_version"] > FORMAT_VERSION:
            raise LoramError(f"{path} has format version {data['format_version']}, newer than this loram "
                             f"understands ({FORMAT_VERSION}); upgrade loram")
        tensors_path = root / data["tensors"]["file"]
        if not tensors_path.is_file() or sha256_file(tensors_path) != data["tensors"]["sha256"]:
            raise LoramError(f"{tensors_path.name} is missing or does not match the sha256 in {MANIFEST_JSON}")
        tensors = load_file(str(tensors_path))
        manifest = Manifest(
            base=BaseModelInfo(**data["base"]), architecture=Shape(**data["architecture"]),
            method=Method(**data["method"]), files=_files(data["files"]), alignment=data["alignment"],
            tool_version=data["tool_version"], format_version=data["format_version"],
            masks={n: PackedMask(tensors.pop(f"masks.{n}"), tuple(m["shape"])) for n, m in data["masks"].items()},
        )
        for entry in data["pruned_layers"]:
            i = entry["layer"]
            for name in ("kept_kv_heads", "kept_mlp_channels"):
                if f"layers.{i}.{name}" in tensors:
                    getattr(manifest, name)[i] = tensors.pop(f"layers.{i}.{name}")
            if manifest.kept_counts().get(i) != (entry["kept_kv_heads"], entry["kept_mlp_channels"]):
                raise LoramError(f"layer {i}: kept counts in {MANIFEST_JSON} ({entry['kept_kv_heads']} KV heads, "
                                 f"{entry['kept_mlp_channels']} MLP channels) do not match {MANIFEST_TENSORS}")
    except (KeyError, TypeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise LoramError(f"{path} is malformed ({type(e).__name__}: {first_line(e)})") from e
    if tensors:
        raise LoramError(f"{MANIFEST_TENSORS} holds tensors {MANIFEST_JSON} does not list: {', '.join(sorted(tensors))}")
    return manifest


def _files(files) -> dict[str, str]:
    """The manifest's `files` (name -> sha256 hex); TypeError (reported as malformed) for anything else."""
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise TypeError("'files' must map file names to sha256 strings")
    return files


def _check_indices(layer: int, what: str, idx: torch.Tensor, size: int) -> None:
    """Messages name the first offending values only: an index list can be thousands long."""
    if idx.dim() != 1 or idx.dtype != torch.int64 or idx.numel() == 0:
        raise LoramError(f"layer {layer}: {what} must be a non-empty 1-D int64 tensor")
    bad = idx[(idx < 0) | (idx >= size)].tolist()
    if bad:
        raise LoramError(f"layer {layer}: {what} index out of range [0, {size}): {', '.join(map(str, bad[:5]))}"
                         + (f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""))
    steps = idx[1:] - idx[:-1]
    if bool((steps == 0).any()):
        at = int((steps == 0).nonzero()[0])
        raise LoramError(f"layer {layer}: {what} has duplicate indices ({int(idx[at])} at position {at})")
    if bool((steps < 0).any()):
        at = int((steps < 0).nonzero()[0])
        raise LoramError(f"layer {layer}: {what} is not sorted ({int(idx[at])} before {int(idx[at + 1])} "
                         f"at position {at})")


def _check_plan(m: Manifest) -> None:
    """Indices in range, sorted, unique; pruned layers inside the method's layer range; masks whole."""
    a = m.architecture
    structured = m.method.kind == "structured"
    if (m.kept_kv_heads or m.kept_mlp_channels) and not structured:
        raise LoramError(f"{m.method.kind} pruning keeps the shapes; the manifest must not list kept indices")
    if m.masks and structured:
        raise LoramError("structured pruning removes units; the manifest must not carry masks")
    start, stop = m.method.layers or (0, a.num_layers)
    for i in m.pruned_layers:
        if not (0 <= i < a.num_layers and start <= i < stop):
            raise LoramError(f"layer {i}: pruned but outside the layer range [{start}, {stop}) "
                             f"of a {a.num_layers}-layer model")
        if i in m.kept_kv_heads:
            _check_indices(i, "kept KV heads", m.kept_kv_heads[i], a.num_kv_heads)
        if i in m.kept_mlp_channels:
            _check_indices(i, "kept MLP channels", m.kept_mlp_channels[i], a.intermediate)
    for name, mask in m.masks.items():
        found = layer_module(name)
        if found is None or name != f"model.layers.{found[0]}.{found[1].path}":
            raise LoramError(f"mask {name}: not a projection name like model.layers.3.self_attn.q_proj")
        i, module = found
        if not (0 <= i < a.num_layers and start <= i < stop):
            raise LoramError(f"mask {name}: layer {i} is outside the layer range [{start}, {stop})")
        if tuple(mask.shape) != a.weight_shape(module):
            raise LoramError(f"mask {name}: shape {list(mask.shape)} differs from the weight's "
                             f"{list(a.weight_shape(module))}")
        if mask.bits.dtype != torch.uint8 or mask.bits.numel() != math.ceil(math.prod(mask.shape) / 8):
            raise LoramError(f"mask {name}: {mask.bits.numel()} packed bytes do not hold shape {list(mask.shape)}")


def _check_config(m: Manifest, config) -> None:
    """The checkpoint's config must carry the original global sizes and, per layer, the kept counts."""
    a, actual = m.architecture, Shape.of(config)
    for name in ("num_layers", "hidden", "num_heads", "num_kv_heads", "head_dim", "intermediate", "vocab"):
        if getattr(actual, name) != getattr(a, name):
            raise LoramError(f"config {name}={getattr(actual, name)} differs from the manifest's original "
                             f"architecture ({getattr(a, name)})")
    counts = m.kept_counts()
    for i in range(a.num_layers):
        kv, mlp = counts.get(i, (a.num_kv_heads, a.intermediate))
        want = (kv * a.group_size, kv, mlp)
        layer = Shape.of(config.per_layer_config[i])  # a stock config gives its global sizes for every layer
        have = (layer.num_heads, layer.num_kv_heads, layer.intermediate)
        if have != want:
            raise LoramError(f"layer {i}: config has {have[0]} query heads, {have[1]} KV heads, {have[2]} MLP "
                             f"channels; the manifest keeps {want[0]}, {want[1]}, {want[2]}")
