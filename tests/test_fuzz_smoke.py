"""A short run of the shift-file fuzzer (the long run is ``scripts/fuzz_shift_files.py``)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings

from devtools.fuzzing import check_file_bytes, metadata_files, mutated_files, seed_files, structured_files

SMOKE = settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))


def test_seed_files_are_accepted():
    with tempfile.TemporaryDirectory() as tmp:
        assert [check_file_bytes(data, Path(tmp)) for data in seed_files()] == ["accepted"] * len(seed_files())


@SMOKE
@given(mutated_files())
def test_mutated_files_are_refused_cleanly_or_work(data):
    with tempfile.TemporaryDirectory() as tmp:
        check_file_bytes(data, Path(tmp))


@SMOKE
@given(structured_files())
def test_random_headers_are_refused_cleanly_or_work(data):
    with tempfile.TemporaryDirectory() as tmp:
        check_file_bytes(data, Path(tmp))


@SMOKE
@given(metadata_files())
def test_random_metadata_is_parsed_or_ignored(data):
    with tempfile.TemporaryDirectory() as tmp:
        assert check_file_bytes(data, Path(tmp)) in ("accepted", "refused")
