"""Bad input through the real ``hecate`` command: each case ends with one line naming the field, file or option,
exit status 2 and no traceback, before any worker starts, and nothing of the user's is deleted or written over.
Also: ``--fresh`` deletes only Hecate's own run folders, a resume survives a torn metrics line, and ``generate``
streams its text."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_simulate_cli import EXAMPLE, SMALL

from hecate.collectives.errors import HecateError
from hecate.trainer.generate import generate_stream, load_trained
from hecate.trainer.metrics import METRICS_FILE, read_metrics
from hecate.trainer.train import RUN_MARKER

pytestmark = pytest.mark.slow  # starts processes

HECATE = str(Path(sys.executable).parent / "hecate")
REFUSAL_TIMEOUT_S = 60  # a refusal needs only the start-up of Python and torch


def hecate(*args: str | bytes, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([HECATE, *args], capture_output=True, text=True, timeout=timeout, check=False)


def train_args(data: Path, run: Path, *overrides: str) -> list[str]:
    args = ["train", EXAMPLE]
    for item in [f"data.dir={data}", f"train.run_dir={run}", *SMALL, *overrides]:
        args += ["-o", item]
    return args


def assert_refused(result: subprocess.CompletedProcess, *says: str) -> str:
    """Exit 2, no traceback, and exactly one error line, which says each of ``says``."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("hecate: error:")]
    assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0]), result.stderr
    for text in says:
        assert text in errors[0], errors[0]
    return errors[0]


def listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained_run(small_data, tmp_path_factory) -> Path:
    """A finished two-step run with its checkpoint; tests copy it before changing anything."""
    run = tmp_path_factory.mktemp("trained") / "run"
    done = hecate(*train_args(small_data, run, "train.steps=2", "checkpoint.every=1"))
    assert done.returncode == 0, done.stderr
    return run


# ---- the run folder: --fresh deletes only Hecate's own --------------------------------------------------------


def test_fresh_refuses_a_folder_hecate_did_not_make(small_data, tmp_path):
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "chapter1.tex").write_text("years of work")
    before = listing(thesis)
    for mode in (["--fresh"], [], ["--resume"]):
        assert_refused(
            hecate(*train_args(small_data, thesis), *mode, timeout=REFUSAL_TIMEOUT_S),
            f"train.run_dir {thesis}",
            "Hecate did not make",
            RUN_MARKER,
        )
        assert listing(thesis) == before


@pytest.mark.parametrize("mode", [["--fresh"], []], ids=["fresh", "plain"])
def test_run_dir_on_the_data_is_refused_and_the_data_untouched(small_data, tmp_path, mode):
    before = listing(small_data)
    for run in (small_data, small_data.parent, small_data / "run"):
        assert_refused(
            hecate(*train_args(small_data, run), *mode, timeout=REFUSAL_TIMEOUT_S),
            "'train.run_dir'",
            "overlaps data.dir",
        )
    assert listing(small_data) == before


def test_old_run_folder_without_marker_says_how_to_proceed(small_data, trained_run, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(trained_run, old)
    (old / RUN_MARKER).unlink()  # as a Hecate from before the marker left it
    before = listing(old)
    assert_refused(
        hecate(*train_args(small_data, old), "--fresh", timeout=REFUSAL_TIMEOUT_S),
        f"run folder {old} has no {RUN_MARKER}",
        f"touch {old / RUN_MARKER}",
    )
    assert listing(old) == before
    (old / RUN_MARKER).touch()
    again = hecate(*train_args(small_data, old, "train.steps=1"), "--fresh")
    assert again.returncode == 0, again.stderr
    assert [r["step"] for r in read_metrics(old) if "loss" in r] == [1]


def test_run_dir_naming_a_file_is_refused(small_data, tmp_path):
    paper = tmp_path / "paper.pdf"
    paper.write_bytes(b"%PDF")
    for mode in (["--fresh"], []):
        assert_refused(
            hecate(*train_args(small_data, paper), *mode, timeout=REFUSAL_TIMEOUT_S), f"train.run_dir {paper} is a file"
        )
    assert paper.read_bytes() == b"%PDF"


# ---- config values and files, before any worker starts -----------------------------------------------------


@pytest.mark.parametrize(
    "overrides, says",
    [
        (["optim.lr=nan"], "'optim.lr': must be a finite number, got nan"),
        (["train.collective_timeout_s=inf"], "'train.collective_timeout_s': must be a finite number"),
        (["optim.grad_clip=nan"], "'optim.grad_clip'"),
        (["fssdp.min_imbalance=nan"], "'fssdp.min_imbalance'"),
        # the vocabulary (512) is known once the data is: tp=3 cannot split it, and the workers never start
        (
            [
                "parallel.tp=3",
                "model.dim=96",
                "model.n_heads=3",
                "model.dense_ffn_dim=96",
                "train.global_batch=9",
                "moe.num_experts=3",
            ],
            "parallel.tp=3 must divide the vocabulary size 512",
        ),
    ],
)
def test_bad_values_are_refused_before_any_worker_starts(small_data, tmp_path, overrides, says):
    run = tmp_path / "run"
    assert_refused(hecate(*train_args(small_data, run, *overrides), "--simulate", "3", timeout=REFUSAL_TIMEOUT_S), says)
    assert not run.exists()


@pytest.mark.parametrize(
    "text, says",
    [
        ("- model\n- train\n", "must be a mapping of sections"),
        ("", "holds no settings"),
        ("model: [unclosed\n", "cannot be parsed"),
    ],
    ids=["list", "empty", "broken"],
)
def test_bad_config_files_are_one_line(tmp_path, text, says):
    config = tmp_path / "config.yaml"
    config.write_text(text)
    assert_refused(hecate("train", str(config), timeout=REFUSAL_TIMEOUT_S), str(config), says)
    assert_refused(hecate("train", str(tmp_path), timeout=REFUSAL_TIMEOUT_S), f"'{tmp_path}' is a folder")


def test_missing_data_dir_is_an_error_not_a_new_data_set(tmp_path):
    data, run = tmp_path / "my_corpus_tokenised", tmp_path / "run"
    assert_refused(
        hecate(*train_args(data, run), timeout=REFUSAL_TIMEOUT_S),
        "'data.dir'",
        "holds no prepared data",
        "data.prepare=true",
    )
    assert not data.exists() and not run.exists()


# ---- resume after a kill mid-write ---------------------------------------------------------------------------


def test_resume_drops_a_torn_last_metrics_line(small_data, trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    with (run / METRICS_FILE).open("a") as metrics:
        metrics.write('{"step": 3, "loss": 4.1')  # killed while writing step 3's record
    resumed = hecate(*train_args(small_data, run, "train.steps=3", "checkpoint.every=1"), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "dropped its torn last line" in resumed.stderr
    steps = [json.loads(line)["step"] for line in (run / METRICS_FILE).read_text().splitlines()]
    assert steps == [1, 2, 2, 3, 3]  # each step, the evaluations at the ends of both runs; the torn record is gone


def test_damaged_metrics_line_before_the_last_is_named(tmp_path):
    (tmp_path / METRICS_FILE).write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(HecateError, match="metrics.jsonl: line 2 is not a metrics record"):
        read_metrics(tmp_path)


# ---- generate and export ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, says",
    [
        (["--temperature", "nan"], "--temperature must be a finite number >= 0"),
        (["--temperature", "-1"], "--temperature"),
        (["--max-new-tokens", "-5"], "--max-new-tokens must be in [1, 10000], got -5"),
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--max-new-tokens", "100000000"], "--max-new-tokens"),
        (["--top-k", "-1"], "--top-k"),
    ],
)
def test_bad_sampling_options_are_one_line(trained_run, args, says):
    assert_refused(hecate("generate", str(trained_run), "--prompt", "def", *args, timeout=REFUSAL_TIMEOUT_S), says)


def test_prompt_that_is_not_utf8_is_one_line(trained_run):
    result = subprocess.run(
        [HECATE.encode(), b"generate", str(trained_run).encode(), b"--prompt", b"def \xff("],
        capture_output=True,
        text=True,
        timeout=REFUSAL_TIMEOUT_S,
        check=False,
    )
    assert_refused(result, "--prompt is not valid UTF-8", "0xff")


@pytest.mark.parametrize(
    "text",
    ["model: [unclosed\n", "- a\n- b\n", "x: !!python/object/apply:os.system [ls]\n", "model:\n  dim: .nan\n"],
    ids=["broken", "list", "python-tag", "nan"],
)
def test_hostile_run_config_is_one_line_in_generate_and_export(trained_run, tmp_path, text):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "config.yaml").write_text(text)
    assert_refused(hecate("generate", str(run), "--prompt", "def", timeout=REFUSAL_TIMEOUT_S), str(run / "config.yaml"))
    assert_refused(
        hecate("export", str(run), "--out", str(tmp_path / "export"), timeout=REFUSAL_TIMEOUT_S),
        str(run / "config.yaml"),
    )
    assert not (tmp_path / "export").exists()


def test_export_does_not_write_over_other_files(trained_run, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    assert_refused(
        hecate("export", str(trained_run), "--out", str(tmp_path), timeout=REFUSAL_TIMEOUT_S),
        f"--out {tmp_path} exists and is not an earlier export",
    )
    assert listing(tmp_path) == {"notes.txt": b"mine"}


def test_generate_streams_tokens_as_they_come(trained_run):
    """The prompt and the first tokens are on stdout while the process is still generating."""
    process = subprocess.Popen(
        [
            HECATE,
            "generate",
            str(trained_run),
            "--prompt",
            "import os",
            "--max-new-tokens",
            "10000",
            "--temperature",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        first = process.stdout.read1(64)  # returns as soon as something was printed
        assert first.startswith(b"import os"), first
        time.sleep(0.5)
        assert process.poll() is None, "finished 10000 tokens before the first were read: nothing streamed"
    finally:
        process.kill()
        process.communicate()


def test_streamed_pieces_are_the_greedy_decoding(trained_run):
    """Joined, the streamed pieces are the decoding of prompt + greedy tokens, computed here step by step."""
    model, tokenizer, _ = load_trained(trained_run)
    ids = tokenizer.encode("def f(x):").ids
    for _ in range(40):
        ids.append(int(model(__import__("torch").tensor([ids[-model.cfg.seq_len :]]))[0, -1].argmax()))
    pieces = list(generate_stream(model, tokenizer, "def f(x):", max_new_tokens=40, temperature=0))
    assert len(pieces) > 1
    assert "".join(pieces) == tokenizer.decode(ids)
