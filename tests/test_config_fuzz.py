"""The config reader against hostile input: random YAML values and structures for random fields, random
overrides. It either returns a validated config or raises one ConfigError line naming where; never another
exception, never a hang."""

import dataclasses

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hecate.collectives.errors import HecateError
from hecate.trainer.config import RunConfig, load_config

SECTIONS = {f.name: [g.name for g in dataclasses.fields(f.default_factory)] for f in dataclasses.fields(RunConfig)}
FIELD_PATHS = [(section, name) for section, names in SECTIONS.items() for name in names]
# strings OmegaConf gives a meaning to (interpolations, resolvers, MISSING) or that paths choke on
NASTY_TEXT = [
    "${model.dim}",
    "${oc.env:HOME}",
    "${oc.decode:'[1]'}",
    "${nope}",
    "${",
    "???",
    "a\0b",
    "",
    " ",
    "..",
    "/",
    "1e400",
    "nan",
    ".inf",
    "-.inf",
    "0x10",
    "true",
    "null",
    "~",
    "[1",
    "{a: 1}",
    "é\udcff",
]
EXAMPLES = 300  # each one is a config load of ~10 ms; a few hundred cover every field with several shapes

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**200), max_value=2**200),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(NASTY_TEXT),
    st.text(max_size=20),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8) | st.integers(), inner, max_size=3)
    ),
    max_leaves=8,
)
keys = st.one_of(st.sampled_from(list(SECTIONS)), st.text(max_size=8), st.integers())


@st.composite
def documents(draw):
    """A YAML document: mostly known fields with random values, sometimes unknown keys or a bare structure."""
    kind = draw(st.sampled_from(["fields", "fields", "fields", "sections", "anything"]))
    if kind == "anything":
        return draw(values)
    if kind == "sections":
        return draw(st.dictionaries(keys, values, max_size=4))
    document: dict = {}
    for section, name in draw(st.lists(st.sampled_from(FIELD_PATHS), min_size=1, max_size=4)):
        document.setdefault(section, {})[name] = draw(values)
    return document


def check_one_line(load) -> None:
    try:
        load()
    except HecateError as err:
        assert "\n" not in str(err), str(err)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=documents())
@pytest.mark.timeout(600)
def test_random_yaml_gives_a_config_or_one_line(tmp_path, document):
    path = tmp_path / "fuzz.yaml"
    try:
        path.write_text(yaml.safe_dump(document, allow_unicode=True), encoding="utf-8", errors="surrogatepass")
    except yaml.representer.RepresenterError:
        return
    check_one_line(lambda: load_config(path))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200) | st.binary(max_size=200))
@pytest.mark.timeout(600)
def test_random_file_bytes_give_a_config_or_one_line(tmp_path, text):
    path = tmp_path / "fuzz.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
    check_one_line(lambda: load_config(path))


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    field=st.sampled_from(FIELD_PATHS) | st.tuples(keys, st.text(max_size=8)),
    value=st.sampled_from(NASTY_TEXT) | st.text(max_size=20) | st.floats().map(str) | st.integers().map(str),
)
@pytest.mark.timeout(600)
def test_random_overrides_give_a_config_or_one_line(field, value):
    check_one_line(lambda: load_config(None, [f"{field[0]}.{field[1]}={value}"]))
