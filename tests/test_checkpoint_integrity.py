"""Checkpoint integrity: every file is checksummed (``SHA256SUMS``, written before ``COMPLETE``); a damaged or
incomplete newest checkpoint is named in one warning and the previous one is resumed; a run whose checkpoints are
all damaged stops with one error. A forged checkpoint (damage with its checksums rewritten to match) is still
refused with one error naming the file, without a traceback and without running anything it holds. A save that
cannot write fails with one error and leaves the older checkpoints as they were.

Every run here is the small model of ``test_checkpoint.py``, trained for real: 4 steps, checkpoints after 2 and 4.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_checkpoint import JOB_DEADLINE_S, config, load_into, simulate_2, step_losses
from test_simulate_cli import train_args
from torch.distributed.checkpoint.metadata import Metadata

from hecate.launch.cli import main
from hecate.parallel.errors import CheckpointError
from hecate.trainer import checkpoint as ckpt
from hecate.trainer import integrity
from hecate.trainer.faults import ENV as FAULT_ENV
from hecate.trainer.integrity import CorruptCheckpoint
from hecate.trainer.train import Trainer

pytestmark = pytest.mark.slow  # starts processes

DATA = "__0_0.distcp"  # the tensors a one-process run writes
STEP_2, STEP_4 = "step_00000002", "step_00000004"
EXPERT_WEIGHT = "model.blocks.1.ffn.experts.w1"
LOGGER = "hecate.trainer.checkpoint"
SAVE_EVERY_2 = ["checkpoint.every=2", "checkpoint.keep=10"]
FILE_LIMIT = 1 << 20  # bytes a file may reach under RLIMIT_FSIZE: the run's small files fit, a checkpoint does not


@pytest.fixture(scope="module")
def trained(small_data, tmp_path_factory) -> Path:
    """A one-process run of 4 steps with complete checkpoints after steps 2 and 4 (copied by each test)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    Trainer(config(small_data, run, "train.steps=4", *SAVE_EVERY_2)).run()
    return run


@pytest.fixture()
def run(trained, tmp_path) -> Path:
    """A copy of the trained run, for a test to damage."""
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def resume(small_data, run: Path, *overrides: str) -> Trainer:
    return Trainer(config(small_data, run, "train.steps=4", *SAVE_EVERY_2, *overrides), resume=True)


def checkpoint(run: Path, name: str = STEP_4) -> Path:
    return run / "checkpoints" / name


def reseal(path: Path) -> None:
    """Rewrite the manifest to match the files as they now are: a forgery, which the checksums cannot see."""
    listed = [line.split("  ", 1)[1] for line in (path / integrity.MANIFEST).read_text().splitlines()]
    integrity.write_manifest(path, {name: integrity.file_sha256(path / name) for name in listed})


def index_of(path: Path) -> Metadata:
    return pickle.loads((path / ckpt.METADATA_FILE).read_bytes())  # the test's own file: trusted


def weights_offset(path: Path) -> int:
    """An offset in the middle of the bytes of an expert weight (a tensor's data, past its header)."""
    info = next(info for key, info in index_of(path).storage_data.items() if key.fqn == EXPERT_WEIGHT)
    return info.offset + info.length // 2


def flip(path: Path, offset: int, count: int = 64) -> None:
    data = bytearray(path.read_bytes())
    data[offset : offset + count] = bytes(b ^ 0xFF for b in data[offset : offset + count])
    path.write_bytes(bytes(data))


PWNED = Path(f"/tmp/hecate-test-pwned-{os.getpid()}")  # what the payload would create: it never exists


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {PWNED}",))


def torch_zip() -> bytes:
    stream = io.BytesIO()
    torch.save({"weights": torch.ones(3)}, stream)
    return stream.getvalue()


DAMAGE = {  # name -> (what is done to the step-4 checkpoint, the file the warning must name)
    "bytes flipped in a data region": (lambda p: flip(p / DATA, weights_offset(p)), DATA),
    "bytes flipped in a data file's header": (lambda p: flip(p / DATA, 0, 16), DATA),
    "data file truncated": (lambda p: (p / DATA).write_bytes((p / DATA).read_bytes()[:1000]), DATA),
    "data file deleted": (lambda p: (p / DATA).unlink(), DATA),
    "pickle payload as data file": (lambda p: (p / DATA).write_bytes(pickle.dumps(_Payload())), DATA),
    "bytes flipped in the index": (lambda p: flip(p / ckpt.METADATA_FILE, 100), ckpt.METADATA_FILE),
    "garbage index": (lambda p: (p / ckpt.METADATA_FILE).write_bytes(os.urandom(4096)), ckpt.METADATA_FILE),
    "torch.save zip as index": (lambda p: (p / ckpt.METADATA_FILE).write_bytes(torch_zip()), ckpt.METADATA_FILE),
    "trainer state edited": (lambda p: (p / ckpt.STATE_FILE).write_text("{}"), ckpt.STATE_FILE),
    "manifest deleted": (lambda p: (p / integrity.MANIFEST).unlink(), integrity.MANIFEST),
    "manifest garbled": (lambda p: (p / integrity.MANIFEST).write_text("not a checksum\n"), integrity.MANIFEST),
}


# ---- damage: found by the checksums, the previous checkpoint resumed -----------------------------------------


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_newest_checkpoint_is_named_and_the_previous_one_resumed(small_data, run, damage, caplog):
    do, file = DAMAGE[damage]
    do(checkpoint(run))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert resume(small_data, run).step == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert f"{STEP_4} is corrupt: {file} " in warnings[0] and "trying the checkpoint before it" in warnings[0]
    assert not PWNED.exists()


def test_flipped_data_bytes_that_loaded_silently_are_now_found(small_data, run, trained):
    """The red team's case: 64 bytes flipped inside a tensor load without complaint when nothing checks them
    (they change the weights, not the file's structure); the checksums find them."""
    flip(checkpoint(run) / DATA, weights_offset(checkpoint(run)))
    damaged, intact = Trainer(config(small_data, run / "probe1")), Trainer(config(small_data, run / "probe2"))
    load_into(damaged, checkpoint(run))
    load_into(intact, checkpoint(trained))
    damaged_w1, intact_w1 = (t.model.state_dict()[EXPERT_WEIGHT.removeprefix("model.")] for t in (damaged, intact))
    assert not torch.equal(damaged_w1, intact_w1)
    with pytest.raises(CorruptCheckpoint, match=f"{STEP_4} is corrupt: {DATA} does not match its checksum"):
        ckpt.verify_checkpoint(checkpoint(run))


def test_resumed_fallback_continues_like_the_uninterrupted_run(small_data, run, trained):
    flip(checkpoint(run) / DATA, weights_offset(checkpoint(run)))
    resumed = resume(small_data, run)
    assert resumed.step == 2
    resumed.run()
    assert step_losses(run) == step_losses(trained)  # steps 3 and 4 again, from the intact step-2 checkpoint


def test_no_usable_checkpoint_is_one_error_naming_each_damaged_file(small_data, run, capsys):
    flip(checkpoint(run, STEP_2) / ckpt.METADATA_FILE, 10)
    (checkpoint(run) / DATA).unlink()
    with pytest.raises(
        CheckpointError,
        match=rf"no usable checkpoint in .*{STEP_4} is corrupt: {DATA} is missing; "
        rf".*{STEP_2} is corrupt: \.metadata does not match its checksum",
    ):
        resume(small_data, run)
    assert main([*train_args(small_data, run, "train.steps=6", *SAVE_EVERY_2), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if "hecate: error" in line] == [err.splitlines()[-1]]
    assert err.splitlines()[-1].startswith("hecate: error: no usable checkpoint in ")


# ---- forgery: damage with matching checksums, refused by the reader ------------------------------------------


@pytest.mark.parametrize("relative", ["../step_00000002/__0_0.distcp", "/etc/hostname", "sub/__0_0.distcp", ".."])
def test_index_paths_outside_the_checkpoint_folder_are_refused(small_data, run, relative, caplog):
    path = checkpoint(run)
    index = index_of(path)
    for info in index.storage_data.values():
        info.relative_path = relative
    (path / ckpt.METADATA_FILE).write_bytes(pickle.dumps(index))
    reseal(path)
    with pytest.raises(CorruptCheckpoint, match=rf"\.metadata names '{relative}', which is not a file inside"):
        ckpt.verify_checkpoint(path)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert resume(small_data, run).step == 2


def test_symbolic_link_out_of_the_checkpoint_is_refused(small_data, run):
    path = checkpoint(run)
    (path / DATA).unlink()
    (path / DATA).symlink_to(checkpoint(run, STEP_2) / DATA)
    reseal(path)
    with pytest.raises(CorruptCheckpoint, match=f"{DATA} is a symbolic link"):
        ckpt.verify_checkpoint(path)
    assert resume(small_data, run).step == 2


def test_manifest_naming_a_file_outside_is_refused(run):
    path = checkpoint(run)
    (path / integrity.MANIFEST).write_text(f"{'0' * 64}  ../{STEP_2}/{DATA}\n")
    with pytest.raises(CorruptCheckpoint, match=f"SHA256SUMS names '../{STEP_2}/{DATA}', which is not a file"):
        ckpt.verify_checkpoint(path)


def test_forged_pickle_in_a_data_file_is_refused_without_running_it(small_data, run):
    """The optimizer's plain values are pickled inside the data file; a payload there, with checksums to match,
    passes verification and is refused by the loader (DCP's CheckpointException caught, not a traceback)."""
    path = checkpoint(run)
    payload = pickle.dumps(_Payload())
    key, info = max(
        ((k, v) for k, v in index_of(path).storage_data.items() if k.fqn.startswith("optim.param_groups")),
        key=lambda item: item[1].length,
    )
    assert info.length >= len(payload)
    data = bytearray((path / DATA).read_bytes())
    data[info.offset : info.offset + info.length] = payload.ljust(info.length, b"\0")
    (path / DATA).write_bytes(bytes(data))
    reseal(path)
    ckpt.verify_checkpoint(path)
    with pytest.raises(
        CheckpointError,
        match=rf"cannot load checkpoint .*{STEP_4}: checkpoint value {key.fqn} is "
        r"not plain data",
    ):
        resume(small_data, run)
    assert not PWNED.exists()


def test_forged_data_file_header_is_one_error(small_data, run):
    path = checkpoint(run)
    flip(path / DATA, 0, 16)
    reseal(path)
    with pytest.raises(CheckpointError, match=rf"cannot load checkpoint .*{STEP_4}: "):
        resume(small_data, run)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    flips=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(1, 255)), min_size=1, max_size=8),
    cut=st.one_of(st.none(), st.integers(0, 1 << 20)),
)
def test_damaged_index_bytes_are_a_corrupt_checkpoint_or_a_checked_index(trained, tmp_path, flips, cut):
    """Whatever bytes the index holds, the restricted reader returns an index it checked or raises
    CorruptCheckpoint naming it: never another exception (the red team's OverflowError), never a traceback."""
    data = bytearray((checkpoint(trained) / ckpt.METADATA_FILE).read_bytes())
    for offset, mask in flips:
        data[offset % len(data)] ^= mask
    (tmp_path / ckpt.METADATA_FILE).write_bytes(bytes(data[:cut]))
    try:
        ckpt.SafeReader(tmp_path).read_metadata()
    except CorruptCheckpoint as err:
        assert err.file == ckpt.METADATA_FILE


# ---- hecate checkpoints verify --------------------------------------------------------------------------------


def test_verify_lists_each_checkpoint_and_fails_when_the_newest_is_not_ok(run, capsys):
    assert main(["checkpoints", "verify", str(run)]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{STEP_2}  ok", f"{STEP_4}  ok", f"a resume would load {STEP_4}"]

    flip(checkpoint(run) / DATA, 5000)
    assert main(["checkpoints", "verify", str(run)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{STEP_2}  ok"
    assert lines[1].startswith(f"{STEP_4}  corrupt: {DATA} does not match its checksum in SHA256SUMS")
    assert lines[2] == f"a resume would load {STEP_2}"

    shutil.copytree(checkpoint(run, STEP_2), run / "checkpoints" / ".tmp-step_00000006")
    (run / "checkpoints" / ".tmp-step_00000006" / ckpt.COMPLETE).unlink()
    assert main(["checkpoints", "verify", str(run)]) == 1
    assert capsys.readouterr().out.splitlines()[2].startswith(".tmp-step_00000006  incomplete: no COMPLETE marker")

    assert main(["checkpoints", "verify", str(run / "nothing")]) == 2
    assert "holds no checkpoints" in capsys.readouterr().err


# ---- saves that cannot write ----------------------------------------------------------------------------------


def hecate_limited(args: list[str], preexec=None, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*prefix, sys.executable, "-m", "hecate.launch.cli", *args],
        capture_output=True,
        text=True,
        timeout=JOB_DEADLINE_S,
        preexec_fn=preexec,
        check=False,
    )


def without_root_powers() -> tuple[str, ...]:
    """A prefix that makes root obey file permissions (as everyone else does): it drops the capabilities that
    override them. Empty for other users."""
    if os.geteuid() != 0:
        return ()
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without util-linux setpriv: file permissions cannot be enforced")
    return ("setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--")


def assert_failed_cleanly(done: subprocess.CompletedProcess, run: Path, cause: str) -> None:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("hecate: error:")]
    assert len(errors) == 1 and "cannot write the checkpoint of step 6" in errors[0] and cause in errors[0], done.stderr
    assert "the older checkpoints are kept" in errors[0]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [STEP_2, STEP_4]
    for name in (STEP_2, STEP_4):
        ckpt.verify_checkpoint(checkpoint(run, name))


def test_save_into_a_read_only_folder_fails_the_step_cleanly(small_data, run):
    folder = run / "checkpoints"
    folder.chmod(0o555)
    try:
        done = hecate_limited(
            [*train_args(small_data, run, "train.steps=6", *SAVE_EVERY_2), "--resume"], prefix=without_root_powers()
        )
    finally:
        folder.chmod(0o755)
    assert_failed_cleanly(done, run, "Permission denied")


def test_save_onto_a_full_disk_fails_the_step_and_removes_what_it_wrote(small_data, run):
    """A file size limit (RLIMIT_FSIZE) makes the checkpoint's data file fail to write as a full disk does,
    after its folder and first files were made."""

    def limit_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT, FILE_LIMIT))

    done = hecate_limited(
        [*train_args(small_data, run, "train.steps=6", *SAVE_EVERY_2), "--resume"], preexec=limit_files
    )
    assert_failed_cleanly(done, run, "")  # the cause is torch's zip writer's, which does not pass on the errno


def test_async_save_killed_in_flight_leaves_an_incomplete_folder_that_resume_skips(
    small_data, tmp_path, caplog, capsys
):
    """A background save completes (checksums, marker, rename) only once the next save or the end of training
    waits for it: killed before, its folder has no marker."""
    run = tmp_path / "run"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "hecate.launch.cli",
            *train_args(
                small_data,
                run,
                "train.steps=4",
                "checkpoint.every=1",
                "checkpoint.keep=10",
                "checkpoint.async_save=true",
            ),
        ],
        capture_output=True,
        text=True,
        timeout=JOB_DEADLINE_S,
        check=False,
        env={**os.environ, FAULT_ENV: "kill@0:3"},
    )
    assert done.returncode == -9, done.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [".tmp-step_00000002", "step_00000001"]
    assert not (run / "checkpoints" / ".tmp-step_00000002" / ckpt.COMPLETE).exists()

    assert main(["checkpoints", "verify", str(run)]) == 1
    assert capsys.readouterr().out.splitlines() == [
        "step_00000001  ok",
        ".tmp-step_00000002  incomplete: no COMPLETE marker (a save that was interrupted or is running)",
        "a resume would load step_00000001",
    ]
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert resume(small_data, run).step == 1
    assert "ignoring incomplete checkpoint" in caplog.text and ".tmp-step_00000002" in caplog.text


# ---- several ranks --------------------------------------------------------------------------------------------


def test_two_ranks_share_the_checksums_and_fall_back_together(small_data, tmp_path, capfd):
    """Each rank hashes a share of the files when saving and when resuming; damage in rank 1's data file is found
    and both ranks resume from the previous checkpoint."""
    run = tmp_path / "run"
    cfg = config(small_data, run, "train.steps=4", *SAVE_EVERY_2, "parallel.ep=2", "checkpoint.async_save=true")
    simulate_2(cfg)
    straight = step_losses(run)
    listed = integrity.read_manifest(checkpoint(run))
    assert sorted(listed) == [ckpt.METADATA_FILE, "__0_0.distcp", "__1_0.distcp", ckpt.STATE_FILE]
    flip(checkpoint(run) / "__1_0.distcp", 3000)
    capfd.readouterr()
    simulate_2(cfg, resume=True)
    err = capfd.readouterr().err
    assert f"{STEP_4} is corrupt: __1_0.distcp does not match its checksum" in err
    assert f"{STEP_2} (step 2)" in err  # rank 0's console: "resumed from ..."
    assert step_losses(run) == straight
