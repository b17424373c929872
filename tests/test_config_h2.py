"""The ``[limits.h2]`` section (`weft.config_h2`): defaults, the header list size following
``[limits]`` ``max_header_bytes``, and one message per mistake naming its key path."""

from __future__ import annotations

import pytest
from support.config import MINIMAL_CONFIG
from support.config import config_errors as errors_of
from support.config import load_text as load

from weft.schema import H2Limits


def test_no_section_means_128_streams_the_rfc_window_and_the_h1_head_limit(tmp_path):
    assert load(tmp_path, MINIMAL_CONFIG).limits.h2 == H2Limits(
        max_concurrent_streams=128, max_header_list_size=32 * 1024, initial_window_size=65535
    )
    assert load(tmp_path, MINIMAL_CONFIG + "[limits.h2]\n").limits.h2 == H2Limits()


def test_the_header_list_size_follows_max_header_bytes_unless_set(tmp_path):
    cfg = load(tmp_path, MINIMAL_CONFIG + '[limits]\nmax_header_bytes = "8KiB"\n')
    assert cfg.limits.h2.max_header_list_size == 8192
    cfg = load(tmp_path, MINIMAL_CONFIG + '[limits]\nmax_header_bytes = "8KiB"\n[limits.h2]\n')
    assert cfg.limits.h2.max_header_list_size == 8192
    cfg = load(
        tmp_path,
        MINIMAL_CONFIG + '[limits]\nmax_header_bytes = "8KiB"\n'
        '[limits.h2]\nmax_header_list_size = "16KiB"\n',
    )
    assert cfg.limits.h2.max_header_list_size == 16384


def test_values_with_units(tmp_path):
    cfg = load(
        tmp_path,
        MINIMAL_CONFIG + "[limits.h2]\nmax_concurrent_streams = 16\n"
        'initial_window_size = "1MiB"\nmax_header_list_size = 4096\n',
    )
    assert cfg.limits.h2 == H2Limits(16, 4096, 1 << 20)


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        ("max_concurrent_streams = 0", "limits.h2.max_concurrent_streams", "between 1 and"),
        ('max_concurrent_streams = "many"', "limits.h2.max_concurrent_streams",
         "expected an integer"),
        ("initial_window_size = 2147483648", "limits.h2.initial_window_size",
         "between 1024 and 2147483647"),
        ("initial_window_size = 100", "limits.h2.initial_window_size", "between 1024"),
        ("max_header_list_size = 10", "limits.h2.max_header_list_size", "between 256"),
        ("max_header_list_size = true", "limits.h2.max_header_list_size", "expected a size"),
        ("max_concurent_streams = 4", "limits.h2.max_concurent_streams",
         'unknown key (did you mean "max_concurrent_streams"?)'),
        ("header_table_size = 4096", "limits.h2.header_table_size", "unknown key"),
    ],
)
def test_each_mistake_names_its_key_path(tmp_path, text, key, words):
    errors = errors_of(tmp_path, MINIMAL_CONFIG + "[limits.h2]\n" + text + "\n")
    assert len(errors) == 1, errors
    assert f": {key}: " in errors[0] and words in errors[0], errors


def test_a_non_table_is_refused_by_key_path(tmp_path):
    errors = errors_of(tmp_path, MINIMAL_CONFIG + "[limits]\nh2 = 5\n")
    assert len(errors) == 1 and ": limits.h2: expected a table" in errors[0], errors
