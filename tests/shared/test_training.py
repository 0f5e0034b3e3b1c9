"""The shared training core: output folder rules, and what train and align do with --overwrite."""

import json
import os

import pytest
from tiny_models import assert_left_alone, existing_output, run_loram, tiny_pruned_workspace

from loram.shared.errors import LoramError
from loram.shared.training import CHECKPOINTS, RUN_CONFIG, RunFolder, run_folder, training_arguments


def test_a_new_folder_is_trained_into_directly(tmp_path):
    folder = run_folder(tmp_path / "new", resume=False, overwrite=False)
    assert folder == RunFolder(tmp_path / "new", tmp_path / "new") and not folder.replaces
    assert folder.checkpoints == tmp_path / "new" / CHECKPOINTS
    assert not (tmp_path / "new").exists()  # planning writes nothing


def test_overwrite_trains_beside_the_old_output_and_removes_nothing(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "keep.txt").write_text("x")
    folder = run_folder(tmp_path / "old", resume=False, overwrite=True)
    assert folder.replaces and folder.work == tmp_path / ".old.replacing" and folder.out == tmp_path / "old"
    assert (tmp_path / "old" / "keep.txt").read_text() == "x"


@pytest.mark.parametrize("kwargs, message", [
    ({"resume": True, "overwrite": True}, "--resume and --overwrite contradict each other"),
    ({"resume": True, "overwrite": False}, "--resume: no complete checkpoint in"),
    ({"resume": False, "overwrite": False}, r"already exists; choose another --out, or pass --overwrite to replace it$"),
])
def test_bad_combinations_are_refused(tmp_path, kwargs, message):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "f").write_text("x")
    with pytest.raises(LoramError, match=message):
        run_folder(tmp_path / "out", **kwargs)


def test_an_existing_run_with_a_checkpoint_suggests_resume(tmp_path):
    (tmp_path / "out" / CHECKPOINTS / "checkpoint-2").mkdir(parents=True)
    (tmp_path / "out" / CHECKPOINTS / "checkpoint-2" / "trainer_state.json").write_text("{}")
    with pytest.raises(LoramError, match="already exists; choose another --out, pass --resume to continue its "
                                         "training, or --overwrite to replace it"):
        run_folder(tmp_path / "out", resume=False, overwrite=False)


@pytest.mark.parametrize("steps, refused", [(3, True), (2, True), (4, False), (None, False)])
def test_resume_needs_steps_past_the_checkpoint(tmp_path, steps, refused):
    """The Trainer, resumed at its last step, would train one step more: --steps not past it is refused."""
    for step in (2, 3):
        (tmp_path / "out" / CHECKPOINTS / f"checkpoint-{step}").mkdir(parents=True)
        (tmp_path / "out" / CHECKPOINTS / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    if refused:
        with pytest.raises(LoramError, match=rf"already reached step 3 \(checkpoint-3\), --steps is {steps}: "
                                             "nothing left to train; pass a --steps above 3"):
            run_folder(tmp_path / "out", resume=True, overwrite=False, steps=steps)
    else:  # more steps to go, or an --epochs run (no --steps): the Trainer knows where it stands
        folder = run_folder(tmp_path / "out", resume=True, overwrite=False, steps=steps)
        assert folder.resume_from == tmp_path / "out" / CHECKPOINTS / "checkpoint-3"


def test_a_run_that_stopped_before_its_first_checkpoint_is_started_again(tmp_path):
    """A run that failed at its first step leaves checkpoints/ with its pinned options only: the same command
    starts it again (and --resume says so), where any other content still needs --resume or --overwrite."""
    checkpoints = tmp_path / "out" / CHECKPOINTS
    checkpoints.mkdir(parents=True)
    (checkpoints / RUN_CONFIG).write_text("{}")
    (checkpoints / ".checkpoint-1.partial").mkdir()  # a save cut short
    assert run_folder(tmp_path / "out", resume=False, overwrite=False) == RunFolder(tmp_path / "out", tmp_path / "out")
    with pytest.raises(LoramError, match="no complete checkpoint in .*; run without --resume to start it again"):
        run_folder(tmp_path / "out", resume=True, overwrite=False)
    (tmp_path / "out" / "model.safetensors").write_text("x")
    with pytest.raises(LoramError, match="already exists"):
        run_folder(tmp_path / "out", resume=False, overwrite=False)


def test_an_existing_file_is_not_an_output_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(LoramError, match="exists and is not a directory"):
        run_folder(tmp_path / "file", resume=False, overwrite=True)


def test_shared_arguments(tmp_path):
    args = training_arguments(RunFolder(tmp_path, tmp_path), max_steps=None, batch=2, grad_accum=3, lr=1e-3,
                              warmup=1, seed=7, evaluate=False, eval_every=5, save_every=4, keep_checkpoints=0,
                              gradient_checkpointing=True, epochs=2.0, prediction_loss_only=True)
    assert (args.max_steps, args.num_train_epochs, args.gradient_accumulation_steps) == (-1, 2.0, 3)
    assert args.lr_scheduler_type.value == "cosine" and args.weight_decay == 0 and args.logging_steps == 1
    assert (args.seed, args.data_seed, args.save_steps, args.save_total_limit) == (7, 7, 4, None)
    assert args.output_dir == str(tmp_path / CHECKPOINTS) and args.report_to == [] and args.disable_tqdm
    assert args.prediction_loss_only and not args.bf16  # CPU: fp32; extras pass through
    assert args.ddp_find_unused_parameters is False  # train's peft model too: no per-step search, no DDP warning


# -- the real commands: --overwrite never loses the old output ------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tiny_pruned_workspace(tmp_path_factory.mktemp("core"))
    (root / "empty.jsonl").write_text("")
    (root / "text.txt").write_text("\n\n".join(f"paragraph {i} " + "words " * 30 for i in range(40)))
    return root


TRAIN = ["--columns", "prompt=question,response=answer", "--seq-len", "32", "--steps", "2", "--save-every", "1"]


@pytest.mark.parametrize("model, data, extra", [
    ("pruned", "empty.jsonl", []),
    ("pruned", "qa.jsonl", ["--targets", "foo"]),
    ("pruned", "qa.jsonl", ["--columns", "prompt=q,response=answer"]),
    ("missing-folder", "qa.jsonl", []),
])
def test_train_overwrite_with_a_bad_input_keeps_the_old_output(checkpoint, tmp_path, model, data, extra):
    old = tmp_path / "adapter"
    before = existing_output(old)
    proc = run_loram("train", checkpoint / model, "--data", checkpoint / data, *TRAIN, *extra, "--out", old,
                     "--overwrite", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: "), proc.stderr
    assert_left_alone(old, before)  # no staging folder left either


def test_train_overwrite_replaces_only_when_complete(checkpoint, tmp_path):
    old = tmp_path / "adapter"
    old.mkdir()
    (old / "precious.txt").write_text("old run")
    proc = run_loram("train", checkpoint / "pruned", "--data", checkpoint / "qa.jsonl", *TRAIN, "--out", old,
                "--overwrite", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert not (old / "precious.txt").exists()
    assert {"adapter_config.json", "adapter_model.safetensors", "training_report.json"} <= set(os.listdir(old))
    assert sorted(p.name for p in (old / CHECKPOINTS).iterdir()) == ["checkpoint-1", "checkpoint-2", RUN_CONFIG]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    report = json.loads((old / "training_report.json").read_text())
    assert report["steps"] == 2 and [r["step"] for r in report["losses"]] == [1, 2]
    # the checkpoints moved with the run: --resume continues from them at the final location
    proc = run_loram("train", checkpoint / "pruned", "--data", checkpoint / "qa.jsonl", *TRAIN[:-4], "--steps", "3",
                "--save-every", "1", "--out", old, "--resume", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((old / "training_report.json").read_text())["steps"] == 3


def _checkpoint(folder, step: int) -> None:
    (folder / CHECKPOINTS / f"checkpoint-{step}").mkdir(parents=True)
    (folder / CHECKPOINTS / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")


def test_resume_after_a_killed_overwrite_continues_that_run_not_the_old_one(tmp_path):
    """`--overwrite` trains into `.out.replacing`; killed after a checkpoint there, `--resume` continues it (and it
    replaces `out` when complete). Killed before one, `--resume` is refused: it would continue the old run."""
    _checkpoint(tmp_path / "out", 5)  # the old run
    staging = tmp_path / ".out.replacing"
    staging.mkdir()
    with pytest.raises(LoramError, match=r"^--resume: an --overwrite run into .*out stopped before its first "
                                         r"checkpoint \(.*\.out\.replacing\); start it again with --overwrite, or "
                                         r"remove .* to resume the training it was replacing$"):
        run_folder(tmp_path / "out", resume=True, overwrite=False)
    with pytest.raises(LoramError, match=r"already exists; choose another --out, or pass --overwrite to replace it$"):
        run_folder(tmp_path / "out", resume=False, overwrite=False)  # --resume, refused above, is not offered
    _checkpoint(staging, 2)
    folder = run_folder(tmp_path / "out", resume=True, overwrite=False, steps=4)
    assert folder == RunFolder(tmp_path / "out", staging, staging / CHECKPOINTS / "checkpoint-2") and folder.replaces
    with pytest.raises(LoramError, match=r"already exists; choose another --out, pass --resume to continue the "
                                         r"--overwrite run that stopped \(.*\.out\.replacing\), or --overwrite"):
        run_folder(tmp_path / "out", resume=False, overwrite=False)
    with pytest.raises(LoramError, match=r"the training in .*\.out\.replacing already reached step 2"):
        run_folder(tmp_path / "out", resume=True, overwrite=False, steps=2)


def test_train_resume_after_a_killed_overwrite_finishes_the_new_run(checkpoint, tmp_path):
    """The new run's options are pinned in its staging folder: --resume with them continues it (before, it resumed
    the old run and refused the new --lr), and the completed run replaces the old output."""
    import shutil

    data = ["--data", checkpoint / "qa.jsonl", *TRAIN[:-4], "--save-every", "1"]
    old, killed = tmp_path / "adapter", tmp_path / "killed"
    for out, lr, steps in ((old, "1e-3", "2"), (killed, "2e-3", "1")):
        proc = run_loram("train", checkpoint / "pruned", *data, "--lr", lr, "--steps", steps, "--out", out,
                         cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
    staging = tmp_path / ".adapter.replacing"  # where `--overwrite --lr 2e-3` was killed after its first checkpoint
    shutil.copytree(killed / CHECKPOINTS, staging / CHECKPOINTS)
    proc = run_loram("train", checkpoint / "pruned", *data, "--lr", "2e-3", "--steps", "2", "--out", old, "--resume",
                     cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "--resume: continuing the --overwrite run that stopped at checkpoint-1" in proc.stderr
    report = json.loads((old / "training_report.json").read_text())
    assert report["steps"] == 2 and report["config"]["lr"] == 2e-3
    assert not staging.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "killed"]


def test_align_overwrite_with_a_bad_input_keeps_the_old_output(checkpoint, tmp_path):
    old = tmp_path / "aligned"
    old.mkdir()
    (old / "precious.txt").write_text("do not lose me")
    proc = run_loram("publish", "align", checkpoint / "pruned", "--data", checkpoint / "empty.jsonl", "--steps", "1",
                "--seq-len", "16", "--out", old, "--overwrite", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "empty" in proc.stderr, proc.stderr
    assert (old / "precious.txt").read_text() == "do not lose me"
    proc = run_loram("publish", "align", checkpoint / "pruned", "--data", checkpoint / "text.txt", "--steps", "1",
                "--seq-len", "16", "--batch", "2", "--save-every", "1", "--out", old, "--overwrite", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert not (old / "precious.txt").exists() and (old / "loram_manifest.json").is_file()
    assert (old / CHECKPOINTS / "checkpoint-1" / "loram_manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aligned"]


def _pinned_run(tmp_path, monkeypatch, processes: int, **options):
    """A fresh run of a tiny align config on `processes`, its options pinned, then a checkpoint to resume."""
    from loram.publisher.align import RESUME_SAME, AlignConfig
    from loram.shared.training import begin, pin_options

    monkeypatch.setenv("WORLD_SIZE", str(processes))
    cfg = AlignConfig(**{"pruned": "p", "data": ["wiki"], "steps": 4, "seq_len": 8, "out": tmp_path / "run", **options})
    folder, same = pin_options(run_folder(cfg.out, resume=False, overwrite=False), cfg, RESUME_SAME)
    assert same is cfg and folder.pinned["global_batch"] == cfg.batch * cfg.grad_accum * processes

    class _Accelerator:
        def wait_for_everyone(self):
            pass

    class _Trainer:
        accelerator, args = _Accelerator(), type("A", (), {"process_index": 0, "should_save": True})()

    begin(folder, _Trainer())
    (folder.checkpoints / "checkpoint-2").mkdir()
    (folder.checkpoints / "checkpoint-2" / "trainer_state.json").write_text("{}")
    return cfg


def _resume(cfg, monkeypatch, processes: int, **changes):
    import dataclasses

    from loram.publisher.align import RESUME_SAME
    from loram.shared.training import pin_options

    monkeypatch.setenv("WORLD_SIZE", str(processes))
    again = dataclasses.replace(cfg, resume=True, **changes)
    return pin_options(run_folder(again.out, resume=True, overwrite=False), again, RESUME_SAME)[1]


def test_resume_on_fewer_processes_keeps_the_global_batch(tmp_path, monkeypatch):
    import warnings

    from loram.shared.errors import LoramWarning

    cfg = _pinned_run(tmp_path, monkeypatch, 4, batch=2, grad_accum=1)  # global batch 8
    assert json.loads((tmp_path / "run" / CHECKPOINTS / RUN_CONFIG).read_text())["global_batch"] == 8
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        assert _resume(cfg, monkeypatch, 4).grad_accum == 1
    assert not [w for w in said if issubclass(w.category, LoramWarning)]
    with pytest.warns(LoramWarning, match=r"^resuming on 1 process\(es\): --grad-accum 1 -> 4 keeps the global "
                                          r"batch of 8 \(--batch 2 per process\)$"):
        resumed = _resume(cfg, monkeypatch, 1)
    assert (resumed.batch, resumed.grad_accum) == (2, 4)
    assert _resume(cfg, monkeypatch, 2, batch=1, grad_accum=4).grad_accum == 4  # same product: accepted as given
    assert _resume(cfg, monkeypatch, 1, batch=8).grad_accum == 1


def test_resume_that_cannot_keep_the_global_batch_is_refused(tmp_path, monkeypatch):
    cfg = _pinned_run(tmp_path, monkeypatch, 2, batch=2, grad_accum=1)  # global batch 4
    with pytest.raises(LoramError) as e:
        _resume(cfg, monkeypatch, 3)
    assert str(e.value) == ("--resume: the run being resumed has a global batch of 4 sequences per step; 3 "
                            "process(es) x --batch 2 cannot make it up with a whole --grad-accum; choose --batch and "
                            "--grad-accum with batch x grad-accum x processes = 4")
    with pytest.raises(LoramError, match="--lr differs from the run being resumed"):
        _resume(cfg, monkeypatch, 2, lr=1e-3)


def test_a_run_pinned_before_the_global_batch_keeps_its_batch(tmp_path, monkeypatch):
    cfg = _pinned_run(tmp_path, monkeypatch, 1, batch=2)
    path = tmp_path / "run" / CHECKPOINTS / RUN_CONFIG
    saved = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in saved.items() if k != "global_batch"} | {"batch": 2, "grad_accum": 1}))
    with pytest.raises(LoramError, match=r"--batch differs from the run being resumed .*--batch 2 -> 4"):
        _resume(cfg, monkeypatch, 1, batch=4)


def test_resume_from_another_working_folder_reads_words_as_words(tmp_path, monkeypatch):
    """`--distill-from base` and `--hidden-layers pruned` are words, not the folders `base/` and `pruned/` a publisher
    keeps beside the run: resumed from another folder they still match; a file given by a relative path is compared
    by where it is. A run pinned before this rule (the words recorded as absolute paths) still resumes."""
    (tmp_path / "base").mkdir()
    (tmp_path / "pruned").mkdir()
    (tmp_path / "text.txt").write_text("some text\n")
    monkeypatch.chdir(tmp_path)
    cfg = _pinned_run(tmp_path, monkeypatch, 1, distill_from="base", hidden_layers="pruned", data=["text.txt"])
    saved = json.loads((tmp_path / "run" / CHECKPOINTS / RUN_CONFIG).read_text())
    assert (saved["distill_from"], saved["hidden_layers"]) == ("base", "pruned")
    assert saved["data"] == [str(tmp_path / "text.txt")]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    _resume(cfg, monkeypatch, 1, data=[str(tmp_path / "text.txt")])  # not refused
    with pytest.raises(LoramError, match="--data differs"):
        _resume(cfg, monkeypatch, 1)  # text.txt here is another (missing) file

    path = tmp_path / "run" / CHECKPOINTS / RUN_CONFIG  # as the earlier rule recorded it, from tmp_path
    path.write_text(json.dumps(saved | {"distill_from": str(tmp_path / "base"), "hidden_layers": str(tmp_path / "pruned")}))
    monkeypatch.chdir(tmp_path)
    _resume(cfg, monkeypatch, 1)


def test_a_checkpoint_this_run_cannot_resume_is_refused_before_anything_loads(tmp_path, monkeypatch):
    """Without FSDP a checkpoint holds one optimizer file and a random-number state per process: it resumes without
    --fsdp on as many processes (a DDP checkpoint under --fsdp failed at the first step with an unexpected DTensor
    error; on another count, after loading everything). FSDP's shards resume on any count."""
    from loram.shared.checkpoints import OPTIMIZER_SHARDS
    from loram.shared.training import check_resumable

    ddp = tmp_path / "ddp" / CHECKPOINTS / "checkpoint-3"
    ddp.mkdir(parents=True)
    for name in ("trainer_state.json", "optimizer.json", "rng_state_0.json", "rng_state_1.json"):
        (ddp / name).write_text("{}")
    folder = run_folder(tmp_path / "ddp", resume=True, overwrite=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    check_resumable(folder)
    with pytest.raises(LoramError, match=r"^--resume --fsdp: .*checkpoint-3 was written without --fsdp .*; resume it "
                                         r"without --fsdp, as it was written, or start a new run"):
        check_resumable(folder, sharded=True)
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(LoramError, match=r"written by 2 process\(es\) and this run has 1; .*run it with torchrun "
                                         r"--nproc_per_node 2, or start a new run"):
        check_resumable(folder)

    (ddp / OPTIMIZER_SHARDS).mkdir()  # as an FSDP run writes it: any count, with or without --fsdp
    for processes in ("1", "3"):
        monkeypatch.setenv("WORLD_SIZE", processes)
        check_resumable(folder)
        check_resumable(folder, sharded=True)


@pytest.mark.parametrize("overwrite", [False, True])
def test_ctrl_c_during_training_says_how_to_go_on(checkpoint, tmp_path, monkeypatch, capsys, overwrite):
    """Ctrl-C while training ends the progress bar's line and says the step, the last complete checkpoint and the
    --resume that continues it (in place of --overwrite for a replacing run); the CLI's generic line is not added."""
    from loram.shared.cli_support import report_error
    from loram.shared.progress import TrainingProgress
    from loram.train import train

    out = tmp_path / "adapter"
    if overwrite:
        out.mkdir()
        (out / "old.txt").write_text("old run")

    def ctrl_c_at_step_3(self, args, state, control, **kwargs):
        if state.global_step == 3:  # checkpoints 1 and 2 are saved; 3 is not yet
            raise KeyboardInterrupt

    monkeypatch.setattr(TrainingProgress, "on_step_end", ctrl_c_at_step_3)
    with pytest.raises(KeyboardInterrupt) as interrupt:
        train(model=str(checkpoint / "pruned"), data=str(checkpoint / "qa.jsonl"), columns="prompt=question,"
              "response=answer", seq_len=32, steps=5, save_every=1, out=out, overwrite=overwrite)
    lines = capsys.readouterr().err.splitlines()
    said = [line for line in lines if line.startswith("interrupted")]
    if overwrite:
        assert said == [f"interrupted at step 3; checkpoint-2 is complete: rerun the command with --resume in place of "
                        f"--overwrite to continue from step 2 ({out} is untouched until the run completes)"], lines
        assert (out / "old.txt").read_text() == "old run"
    else:
        assert said == ["interrupted at step 3; checkpoint-2 is complete: rerun the same command with --resume to "
                        "continue from step 2"], lines
    assert report_error(interrupt.value) == 130 and capsys.readouterr().err == ""  # said once
