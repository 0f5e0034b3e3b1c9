"""Pickle-free, atomic, exactly resumable Trainer checkpoints, on a tiny Llama (LoRA and full)."""

import copy
import json
import random
import shutil

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from tiny_models import tiny_model, tiny_tokenizer
from transformers import TrainerCallback, TrainingArguments

from loram.shared.checkpoints import (
    SafeCheckpointTrainer,
    latest_checkpoint,
    load_state,
    pickle_files,
    save_state,
)
from loram.shared.errors import LoramError

MAX_STEPS, SAVE_STEPS = 8, 3
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# What save_pretrained may write besides JSON and safetensors: the peft model card, chat templates.
TEXT_SUFFIXES = {".md", ".txt", ".jinja"}


def _dataset(n: int = 12, seq: int = 16) -> list[dict]:
    """12 examples at batch 2: 6 steps an epoch, so 8 steps resume mid-epoch and cross an epoch."""
    ids = torch.randint(3, 97, (n, seq), generator=torch.Generator().manual_seed(1))
    return [{"input_ids": x, "labels": x.clone()} for x in ids]


def _model(kind: str, lora_dropout: float = 0.0):
    model = tiny_model("llama-gqa")
    if kind == "full":
        return model
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=lora_dropout, target_modules=LORA_TARGETS,
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


class Recorder(TrainerCallback):
    """Keeps the loss of each step, the optimizer state at each save and at the start of training."""

    def __init__(self, stop_after: int | None = None):
        self.stop_after = stop_after
        self.losses: dict[int, float] = {}
        self.saved_optimizer: dict[int, dict] = {}
        self.optimizer_at_begin = None

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.optimizer_at_begin = copy.deepcopy(optimizer.state_dict())  # after a resume's load

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" in logs:
            self.losses[state.global_step] = logs["loss"]

    def on_save(self, args, state, control, optimizer=None, **kwargs):
        self.saved_optimizer[state.global_step] = copy.deepcopy(optimizer.state_dict())
        if state.global_step == self.stop_after:
            control.should_training_stop = True  # an interruption right after this checkpoint


def _train(out, kind, resume=None, stop_after=None, lora_dropout=0.0, **overrides) -> Recorder:
    """One run of MAX_STEPS steps (LR schedule over all 8 even when stopped early)."""
    args = TrainingArguments(
        output_dir=str(out), max_steps=MAX_STEPS, per_device_train_batch_size=2, learning_rate=1e-2,
        lr_scheduler_type="linear", warmup_steps=2, logging_steps=1, save_strategy="steps",
        save_steps=SAVE_STEPS, seed=0, data_seed=0, report_to=[], use_cpu=True, disable_tqdm=True,
        **overrides,
    )
    recorder = Recorder(stop_after)
    trainer = SafeCheckpointTrainer(model=_model(kind, lora_dropout), args=args, train_dataset=_dataset(),
                                    processing_class=tiny_tokenizer(), callbacks=[recorder])
    trainer.train(resume_from_checkpoint=resume)
    return recorder


def _assert_same_state(a, b, where="state"):
    """Equal structure and types; tensors equal bit for bit, with the same dtype."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype}{a.shape} != {b.dtype}{b.shape}"
        assert torch.equal(a.cpu(), b.cpu()), f"{where}: values differ"
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        for k in a:
            _assert_same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same_state(x, y, f"{where}.{i}")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: threads only add contention (20x slower on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Run A of each kind: 8 uninterrupted steps, keeping at most 2 checkpoints. Cached per kind."""
    runs = {}

    def get(kind):
        if kind not in runs:
            out = tmp_path_factory.mktemp(f"reference-{kind}")
            runs[kind] = (out, _train(out, kind, save_total_limit=2))
        return runs[kind]

    return get


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_checkpoint_holds_only_safetensors_and_json(reference, kind):
    out, recorder = reference(kind)
    ckpt = out / "checkpoint-6"
    names = {p.name for p in ckpt.iterdir()}
    weights = "adapter_model.safetensors" if kind == "lora" else "model.safetensors"
    assert {weights, "optimizer.safetensors", "optimizer.json", "scheduler.json", "rng_state.safetensors",
            "rng_state.json", "trainer_state.json", "tokenizer.json"} <= names, names
    assert "training_args.bin" not in names and pickle_files(ckpt) == []
    for p in ckpt.rglob("*"):
        if p.is_dir():
            continue
        data = p.read_bytes()
        if p.suffix == ".safetensors":  # an 8-byte header length, then a JSON header
            with safe_open(str(p), framework="pt") as f:
                assert list(f.keys()), f"{p.name} holds no tensors"
            continue
        assert not data.startswith((b"\x80", b"PK")), f"{p.name} looks like a pickle or a torch.save zip"
        if p.suffix == ".json":
            json.loads(data)
        else:
            assert p.suffix in TEXT_SUFFIXES, f"unexpected file {p.name} in a checkpoint"
            data.decode("utf-8")
    # The optimizer's JSON half is readable: param groups with their hyperparameters, no tensors.
    groups = json.loads((ckpt / "optimizer.json").read_text())["param_groups"]
    assert groups[0]["betas"] == {"__tuple__": [0.9, 0.999]} and "lr" in groups[0]


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_save_total_limit_still_rotates(reference, kind):
    out, recorder = reference(kind)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-6", "checkpoint-8"]
    assert sorted(recorder.saved_optimizer) == [3, 6, 8]
    assert latest_checkpoint(out) == out / "checkpoint-8"


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_resume_gives_the_same_losses_and_optimizer_state(reference, tmp_path, kind):
    _, run_a = reference(kind)
    assert sorted(run_a.losses) == list(range(1, MAX_STEPS + 1))

    run_b1 = _train(tmp_path, kind, stop_after=SAVE_STEPS)
    assert sorted(run_b1.losses) == [1, 2, 3]
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-3"]
    run_b2 = _train(tmp_path, kind, resume=tmp_path / "checkpoint-3")

    assert {s: run_b1.losses[s] for s in (1, 2, 3)} == {s: run_a.losses[s] for s in (1, 2, 3)}
    assert run_b2.losses == {s: run_a.losses[s] for s in range(4, MAX_STEPS + 1)}  # exactly, on CPU
    # the optimizer after loading is the one that was saved, bit for bit
    _assert_same_state(run_b1.saved_optimizer[3], run_b2.optimizer_at_begin, "optimizer")
    _assert_same_state(run_a.saved_optimizer[8], run_b2.saved_optimizer[8], "optimizer")


def test_resume_at_an_epoch_boundary_replaces_the_later_checkpoint(reference, tmp_path):
    """Resuming run A's checkpoint-6 (end of epoch 0) saves checkpoint-8 again, over the old one."""
    out, run_a = reference("lora")
    shutil.copytree(out, tmp_path, dirs_exist_ok=True)
    resumed = _train(tmp_path, "lora", resume=tmp_path / "checkpoint-6")
    assert resumed.losses == {7: run_a.losses[7], 8: run_a.losses[8]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-6", "checkpoint-8"]  # no .old left
    _assert_same_state(load_state(tmp_path / "checkpoint-8", "optimizer"),
                       load_state(out / "checkpoint-8", "optimizer"), "optimizer")


def test_resume_restores_the_random_state_dropout_draws_from(tmp_path):
    """With LoRA dropout on, losses after the resume match only if the torch RNG is restored."""
    run_a = _train(tmp_path / "a", "lora", lora_dropout=0.3)
    _train(tmp_path / "b", "lora", lora_dropout=0.3, stop_after=SAVE_STEPS)
    run_b2 = _train(tmp_path / "b", "lora", lora_dropout=0.3, resume=True)
    assert run_b2.losses == {s: run_a.losses[s] for s in range(4, MAX_STEPS + 1)}


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_interrupted_save_leaves_the_previous_checkpoint(reference, tmp_path, monkeypatch, kind):
    _, run_a = reference(kind)
    write_rng = SafeCheckpointTrainer._save_rng_state

    def ctrl_c_at_step_6(self, output_dir):
        if self.state.global_step == 6:  # model and optimizer already written, RNG and state not yet
            raise KeyboardInterrupt
        write_rng(self, output_dir)

    monkeypatch.setattr(SafeCheckpointTrainer, "_save_rng_state", ctrl_c_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path, kind)
    monkeypatch.undo()

    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-3"]  # no checkpoint-6, no leftover
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-3"
    # A process killed with SIGKILL cannot clean up: its staging folder is ignored, then replaced.
    (tmp_path / ".checkpoint-6.partial").mkdir()
    (tmp_path / ".checkpoint-6.partial" / "adapter_model.safetensors").write_bytes(b"truncated")
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-3"

    resumed = _train(tmp_path, kind, resume=True)
    assert resumed.losses == {s: run_a.losses[s] for s in range(4, MAX_STEPS + 1)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "checkpoint-6", "checkpoint-8"]


def test_latest_checkpoint_skips_partial_and_foreign_folders(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None
    assert latest_checkpoint(tmp_path) is None
    for name in ["checkpoint-2", "checkpoint-10", "checkpoint-30", ".checkpoint-40.partial", "checkpoint-x"]:
        (tmp_path / name).mkdir()
    for name in ["checkpoint-2", "checkpoint-10", ".checkpoint-40.partial", "checkpoint-x"]:
        (tmp_path / name / "trainer_state.json").write_text("{}")
    # checkpoint-30 has no trainer_state.json: cut short by a writer that does not rename
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-10"  # by step, not by name


def test_resume_refuses_pickled_checkpoints(tmp_path):
    ckpt = tmp_path / "checkpoint-3"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text("{}")
    (ckpt / "optimizer.pt").write_bytes(b"\x80\x04")
    with pytest.raises(LoramError, match="pickle"):
        _train(tmp_path, "lora", resume=ckpt)
    with pytest.raises(LoramError, match="no complete checkpoint"):
        _train(tmp_path / "empty", "lora", resume=True)


def test_state_round_trip_keeps_types_and_bits(tmp_path):
    state = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}, 7: {"flag": torch.ones(2).bool()}},
        "param_groups": [{"lr": 0.1 + 0.2, "betas": (0.9, 0.999), "params": [0, 7], "fused": None}],
        "nested": [(1, "a"), {"inf": float("inf")}],
    }
    view = torch.arange(6.0)
    state["shared"] = [view[:3], view[3:]]  # share one storage, which safetensors refuses as is
    save_state(state, tmp_path, "thing")
    _assert_same_state(state, load_state(tmp_path, "thing"))
    save_state({"base_lrs": [0.001], "_step_count": 2}, tmp_path, "plain")
    assert not (tmp_path / "plain.safetensors").exists()
    with pytest.raises(TypeError, match="param_groups.0.fn"):
        save_state({"param_groups": [{"fn": print}]}, tmp_path, "bad")


def test_rng_state_round_trip(tmp_path):
    trainer = SafeCheckpointTrainer(model=tiny_model(), args=TrainingArguments(
        output_dir=str(tmp_path), report_to=[], use_cpu=True, disable_tqdm=True))
    trainer._save_rng_state(str(tmp_path))

    def draw():
        return random.random(), np.random.rand(), np.random.randn(), torch.rand(3).tolist()

    first = draw()
    trainer._load_rng_state(str(tmp_path))
    assert draw() == first


def test_a_tied_lm_head_is_not_reported_missing_on_resume(tmp_path, monkeypatch):
    """Tied to the embeddings, lm_head.weight is not saved; a resumed run loads it with them: no false alarm.
    A key that is really missing is still reported."""
    from torch.nn.modules.module import _IncompatibleKeys
    from transformers import Trainer

    model = tiny_model()  # llama-gqa: tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    trainer = SafeCheckpointTrainer(model=model, args=TrainingArguments(
        output_dir=str(tmp_path), report_to=[], use_cpu=True, disable_tqdm=True))
    reported = []
    monkeypatch.setattr(Trainer, "_issue_warnings_after_load", lambda self, result: reported.append(result))
    trainer._issue_warnings_after_load(_IncompatibleKeys(["lm_head.weight"], []))
    trainer._issue_warnings_after_load(_IncompatibleKeys(["lm_head.weight", "model.norm.weight"], ["x"]))
    assert [(r.missing_keys, r.unexpected_keys) for r in reported] == [([], []), (["model.norm.weight"], ["x"])]


def test_bitsandbytes_8bit_optimizer_state_round_trips(tmp_path):
    """The QLoRA optimizer: its quantisation state sits under a "__bnb_..." key, with int steps."""
    bnb = pytest.importorskip("bitsandbytes")
    param = torch.nn.Parameter(torch.randn(64, 64))
    optimizer = bnb.optim.AdamW8bit([param], lr=1e-3)
    param.grad = torch.randn_like(param)
    optimizer.step()
    save_state(optimizer.state_dict(), tmp_path, "optimizer")
    restored = bnb.optim.AdamW8bit([param], lr=1e-3)
    restored.load_state_dict(load_state(tmp_path, "optimizer"))
    _assert_same_state(optimizer.state_dict(), restored.state_dict(), "optimizer")


def test_scaler_round_trip(tmp_path):
    trainer = SafeCheckpointTrainer(model=tiny_model(), args=TrainingArguments(
        output_dir=str(tmp_path), report_to=[], use_cpu=True, disable_tqdm=True))
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=7)
    trainer._save_scaler(str(tmp_path))
    assert json.loads((tmp_path / "scaler.json").read_text())["scale"] == 1024.0
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu")
    trainer._load_scaler(str(tmp_path))
    assert trainer.accelerator.scaler.state_dict()["growth_interval"] == 7
    assert trainer.accelerator.scaler.get_scale() == 1024.0
