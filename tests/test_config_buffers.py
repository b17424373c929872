"""The ``[buffers]`` section (`weft.config_buffers`): the default, sizes with units, and one
message per mistake naming its key path."""

from __future__ import annotations

import pytest
from support.config import MINIMAL_CONFIG
from support.config import config_errors as errors_of
from support.config import load_text as load

from weft.bufpool import MIN_MEMORY
from weft.schema import Buffers


def test_no_section_and_an_empty_one_mean_64_mib(tmp_path):
    assert load(tmp_path, MINIMAL_CONFIG).buffers == Buffers(memory=64 << 20)
    assert load(tmp_path, MINIMAL_CONFIG + "[buffers]\n").buffers.memory == 64 << 20


@pytest.mark.parametrize(
    ("value", "memory"),
    [('"1MiB"', 1 << 20), ('"2GiB"', 2 << 30), ("87296", MIN_MEMORY), ('"16GiB"', 16 << 30)],
)
def test_memory_is_a_size(tmp_path, value, memory):
    cfg = load(tmp_path, MINIMAL_CONFIG + f"[buffers]\nmemory = {value}\n")
    assert cfg.buffers.memory == memory


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        ('memory = "64KiB"', "buffers.memory", "cannot hold one buffer of each size class"),
        (f"memory = {MIN_MEMORY - 1}", "buffers.memory", f"at least {MIN_MEMORY} bytes"),
        ('memory = "17GiB"', "buffers.memory", "above 16GiB"),
        ('memory = "lots"', "buffers.memory", "expected a size"),
        ("memory = true", "buffers.memory", "expected a size"),
        ('memroy = "1MiB"', "buffers.memroy", 'unknown key (did you mean "memory"?)'),
    ],
)
def test_each_mistake_names_its_key_path(tmp_path, text, key, words):
    errors = errors_of(tmp_path, MINIMAL_CONFIG + f"[buffers]\n{text}\n")
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"{tmp_path / 'weft.toml'}: {key}: ")
    assert words in errors[0]


def test_buffers_must_be_a_table(tmp_path):
    errors = errors_of(tmp_path, "buffers = 1\n" + MINIMAL_CONFIG)
    assert errors == [f"{tmp_path / 'weft.toml'}: buffers: expected a table, got int"]
