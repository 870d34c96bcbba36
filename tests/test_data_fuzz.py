"""The prepared-data readers against hostile input: random bytes and random JSON in the manifest, random values in
its fields, random bytes written over or cut from a shard. Opening the data and reading a batch either works on
intact data or raises one HecateError line; never another exception, never a hang."""

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hecate.collectives.errors import HecateError
from hecate.trainer.data import MANIFEST_FILE, TrainLoader, ValLoader

pytestmark = pytest.mark.timeout(300)
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)


def read_everything(data_dir: Path) -> None:
    """What training does with a data folder: open both splits and read a batch of each."""
    train = TrainLoader(data_dir, seq_len=16, global_batch=2)
    train.batch(0, 0)
    for batch in ValLoader(data_dir, seq_len=16, batch_size=2, max_batches=1):
        assert batch[0].shape[0] >= 1


def refused_or_read(data_dir: Path) -> None:
    try:
        read_everything(data_dir)
    except HecateError as err:
        assert "\n" not in str(err).strip(), str(err)


@pytest.fixture
def copy_of(small_data):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "data"
        shutil.copytree(small_data, folder)
        yield folder


@FUZZ
@given(payload=st.binary(max_size=300) | JSON.map(lambda v: json.dumps(v).encode()))
def test_a_random_manifest_is_refused_in_one_line(copy_of, payload):
    (copy_of / MANIFEST_FILE).write_bytes(payload)
    with pytest.raises(HecateError):
        read_everything(copy_of)


@FUZZ
@given(data=st.data())
def test_random_values_in_manifest_fields_never_escape(copy_of, data):
    path = copy_of / MANIFEST_FILE
    original = path.read_text()
    manifest = json.loads(original)
    entry, key = manifest, data.draw(st.sampled_from(sorted(manifest)))
    while isinstance(entry[key], dict) and entry[key] and data.draw(st.booleans()):
        entry, key = entry[key], data.draw(st.sampled_from(sorted(entry[key])))
    entry[key] = data.draw(JSON)
    path.write_text(json.dumps(manifest))
    try:
        refused_or_read(copy_of)
    finally:
        path.write_text(original)


@FUZZ
@given(data=st.data())
def test_damaged_or_cut_shards_are_refused_in_one_line(copy_of, data):
    shard = data.draw(st.sampled_from(sorted(p.name for p in copy_of.glob("*.bin"))))
    path = copy_of / shard
    original = path.read_bytes()
    if data.draw(st.booleans()):
        at = data.draw(st.integers(0, len(original) - 1))
        noise = data.draw(st.binary(min_size=1, max_size=64))
        damaged = original[:at] + noise + original[at + len(noise) :]
        damaged = damaged[: len(original)] if damaged != original[: len(damaged)] else damaged
    else:
        damaged = original[: data.draw(st.integers(0, len(original) - 1))]
    path.write_bytes(damaged)
    try:
        if damaged == original:
            read_everything(copy_of)
        else:
            with pytest.raises(HecateError):
                read_everything(copy_of)
    finally:
        path.write_bytes(original)
