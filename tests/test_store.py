"""The sweep store: crash safety under SIGKILL, resume, damaged and foreign files, other sweeps."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pandas.testing as pdt
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import child_environment
from hypothesis import given, settings
from hypothesis import strategies as st

from vgcore._store import IDENTITY_KEY, Store, StoreError, identity_hash, write_atomic
from vgcore.sweep import SweepResult, load, sweep

sys.path.insert(0, str(Path(__file__).parent))
import _sweep_child as child

# the module, not the function that vgcore may export under the same name
sweep_module = importlib.import_module("vgcore.sweep")

GRID = {"depth": [6, 9], "width": 8, "sigma_w": [0.9, 1.4], "sigma_b": [0.0, 0.2]}
OTHER_GRID = {"depth": [6, 9], "width": 8, "sigma_w": [0.9, 1.4], "sigma_b": [0.0, 0.3]}
# The store does not depend on the backend; the NumPy reference is the quickest for these tiny
# stacks and, unlike OpenMP threads, does not slow down when other processes load the cores.
BACKEND = child.BACKEND


def _parts(store: Path) -> list[Path]:
    return sorted(store.glob("part-*.parquet"))


def _add_part(store: Path, number: int, data: bytes) -> str:
    """Put ``data`` into the store as part ``number``, under a name carrying its true checksum."""
    name = f"part-{number:06d}-{hashlib.sha256(data).hexdigest()}.parquet"
    (store / name).write_bytes(data)
    return name


def _temporaries(store: Path) -> list[Path]:
    return sorted(store.glob(".*.tmp"))


def _stored_rows(store: Path) -> np.ndarray:
    """Every stored row number, over all parts (duplicates kept)."""
    parts = [pq.read_table(part, columns=["_row"]).column("_row").to_numpy() for part in _parts(store)]
    return np.concatenate(parts) if parts else np.empty(0, np.int64)


def _full_store(path: Path, grid=GRID, chunk_size: int = 3) -> SweepResult:
    return sweep(grid, batch=4, seeds=2, store=path, chunk_size=chunk_size, progress=False, backend=BACKEND)


@pytest.fixture(scope="module")
def reference() -> pd.DataFrame:
    return sweep(GRID, batch=4, seeds=2, progress=False, backend=BACKEND).frame


# --------------------------------------------------------------------------
# SIGKILL at several points


def _spawn(store: Path, *options: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(Path(child.__file__)), str(store), *options],
                            env=child_environment(), cwd=store.parent, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _kill_when(process: subprocess.Popen, ready, timeout: float = 60.0) -> None:
    """SIGKILL ``process`` as soon as ``ready()`` holds (polled every millisecond)."""
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            if process.poll() is not None:
                pytest.fail(f"the sweep ended (status {process.returncode}) before the kill point: "
                            f"{process.stderr.read()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("the kill point was not reached in time")
            time.sleep(0.001)
    finally:
        process.kill()
        process.wait()
        process.stdout.close()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL


def _check_consistent(store: Path, reference_frame: pd.DataFrame) -> int:
    """A killed store reads cleanly, and each row it holds equals the uninterrupted run's."""
    result = load(store)
    rows = _stored_rows(store)
    assert len(np.unique(rows)) == len(rows), "a row was stored twice"
    assert sorted(rows.tolist()) == result.rows.tolist()
    expected = reference_frame.iloc[result.rows].reset_index(drop=True)
    pdt.assert_frame_equal(result.frame, expected)
    return len(rows)


def test_sigkill_at_several_points_then_resume_equals_uninterrupted_run(tmp_path):
    store = tmp_path / "store"
    reference_frame = sweep(child.GRID, batch=child.BATCH, seeds=child.SEEDS, progress=False,
                            backend=BACKEND).frame
    total = len(reference_frame)

    # 1. as soon as the first part is in place: between chunks, or computing the second
    process = _spawn(store)
    _kill_when(process, lambda: len(_parts(store)) >= 1)
    stored = stored_first = _check_consistent(store, reference_frame)

    # 2. in the middle of writing a part: half of its bytes in the temporary file
    process = _spawn(store, "--stall-write")
    _kill_when(process, lambda: process.stdout.readline().startswith("stalled"))
    temporaries = _temporaries(store)
    assert temporaries and all(0 < t.stat().st_size for t in temporaries), "no half-written part"
    stored_middle = _check_consistent(store, reference_frame)
    assert stored_middle == stored  # the half-written chunk is lost, nothing else

    # 3. after at least two more parts
    before = len(_parts(store))
    process = _spawn(store)
    _kill_when(process, lambda: len(_parts(store)) >= before + 2)
    stored = _check_consistent(store, reference_frame)
    assert 0 < stored_first and stored < total, "a kill point was not mid-run"
    print(f"kill points left {stored_first} / {stored_middle} / {stored} of {total} rows stored")

    # resume to the end, in this process
    result = sweep(child.GRID, batch=child.BATCH, seeds=child.SEEDS, store=store, chunk_size=child.CHUNK_SIZE,
                   progress=False, backend=BACKEND)
    assert result.computed == total - stored
    pdt.assert_frame_equal(result.frame, reference_frame)
    rows = _stored_rows(store)
    assert sorted(rows.tolist()) == list(range(total)), "missing or duplicated rows"
    assert not _temporaries(store), "the killed run's temporary file was not cleaned up"


class _Interrupted(Exception):
    """Stands for anything that stops a sweep between chunks (Ctrl-C, a failing chunk)."""


@settings(max_examples=12)
@given(chunk_size=st.integers(1, 5), failing_chunk=st.integers(0, 8))
def test_interrupted_at_any_chunk_resumes_to_the_same_frame(tmp_path_factory, reference, chunk_size,
                                                           failing_chunk):
    store = tmp_path_factory.mktemp("store")
    calls = []
    original = sweep_module.run_chunk

    def failing(tasks, *arguments):
        calls.append(len(tasks))
        if len(calls) == failing_chunk + 1:
            raise _Interrupted
        return original(tasks, *arguments)

    sweep_module.run_chunk = failing
    try:
        try:
            sweep(GRID, batch=4, seeds=2, store=store, chunk_size=chunk_size, progress=False, backend=BACKEND)
            interrupted = False
        except _Interrupted:
            interrupted = True
    finally:
        sweep_module.run_chunk = original
    stored = len(_stored_rows(store))
    total = len(reference)
    assert interrupted == (failing_chunk < -(-total // chunk_size))
    if interrupted:
        assert stored == min(total, failing_chunk * chunk_size)
    result = sweep(GRID, batch=4, seeds=2, store=store, chunk_size=chunk_size, progress=False,
                   backend=BACKEND)
    assert result.computed == total - stored
    pdt.assert_frame_equal(result.frame, reference)
    assert sorted(_stored_rows(store).tolist()) == list(range(total))


# --------------------------------------------------------------------------
# Resume


def test_resume_skips_finished_rows_and_no_resume_recomputes(tmp_path, reference):
    store = tmp_path / "s"
    first = _full_store(store)
    parts = _parts(store)
    assert first.computed == len(reference)
    again = _full_store(store)
    assert again.computed == 0
    assert _parts(store) == parts, "a resumed, finished sweep wrote parts"
    pdt.assert_frame_equal(again.frame, reference)
    fresh = sweep(GRID, batch=4, seeds=2, store=store, resume=False, progress=False, backend=BACKEND)
    assert fresh.computed == len(reference)
    pdt.assert_frame_equal(fresh.frame, reference)
    assert sorted(_stored_rows(store).tolist()) == list(range(len(reference)))


def test_temporary_files_are_ignored_then_cleaned(tmp_path, reference):
    store = tmp_path / "s"
    _full_store(store)
    leftover = store / ".part-000099.parquet.0123456789ab.tmp"
    leftover.write_bytes(b"PAR1 half a file")
    pdt.assert_frame_equal(load(store).frame, reference)  # reading ignores it ...
    assert leftover.exists()  # ... and never deletes anything
    _full_store(store)
    assert not leftover.exists()


# --------------------------------------------------------------------------
# Damaged, foreign, other sweeps


def test_truncated_part_is_reported_by_name(tmp_path):
    store = tmp_path / "s"
    _full_store(store)
    victim = _parts(store)[1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    for attempt in (lambda: load(store), lambda: _full_store(store)):
        with pytest.raises(StoreError, match=rf"{victim.name} is damaged or truncated"):
            attempt()


def test_garbage_part_is_reported_by_name(tmp_path):
    store = tmp_path / "s"
    _full_store(store)
    (store / "part-000777.parquet").write_bytes(b"not parquet at all" * 10)
    with pytest.raises(StoreError, match=r"part-000777\.parquet is truncated or not a Parquet file"):
        load(store)


def test_part_of_another_sweep_is_foreign(tmp_path):
    store, other = tmp_path / "s", tmp_path / "other"
    _full_store(store)
    _full_store(other, OTHER_GRID)
    shutil.copy(_parts(other)[0], store / "part-000500.parquet")
    with pytest.raises(StoreError, match=r"part-000500\.parquet is foreign"):
        load(store)
    with pytest.raises(StoreError, match=r"part-000500\.parquet is foreign"):
        _full_store(store)


def test_parquet_file_without_the_stamp_is_foreign(tmp_path):
    store = tmp_path / "s"
    _full_store(store)
    pq.write_table(pa.table({"_row": [0, 1], "chi": [1.0, 2.0]}), store / "part-000600.parquet")
    with pytest.raises(StoreError, match=r"part-000600\.parquet is foreign \(it belongs to no vgcore sweep"):
        load(store)


def test_a_part_repeating_rows_is_refused(tmp_path):
    store = tmp_path / "s"
    _full_store(store)
    name = _add_part(store, 900, _parts(store)[0].read_bytes())
    with pytest.raises(StoreError, match=rf"{name} repeats rows"):
        load(store)


def test_part_with_rows_outside_the_sweep_is_foreign(tmp_path):
    store = tmp_path / "s"
    _full_store(store)
    part = _parts(store)[0]
    table = pq.read_table(part)
    rows = pa.array(np.asarray(table.column("_row")) + 1000)
    sink = pa.BufferOutputStream()
    pq.write_table(table.set_column(0, "_row", rows), sink)
    name = _add_part(store, 901, sink.getvalue().to_pybytes())
    with pytest.raises(StoreError, match=rf"{name} is foreign \(row numbers outside"):
        load(store)


@pytest.mark.parametrize("change", [
    {"grid": OTHER_GRID},
    {"seeds": 3},
    {"batch": 5},
], ids=["grid", "seeds", "batch"])
def test_a_store_of_another_sweep_is_refused(tmp_path, change):
    store = tmp_path / "s"
    _full_store(store)
    parts = sorted(p.read_bytes() for p in _parts(store))
    arguments = {"grid": GRID, "batch": 4, "seeds": 2, **change}
    key = {"grid": "sigma_b", "seeds": "seeds", "batch": "batch"}[next(iter(change))]
    with pytest.raises(StoreError, match=rf"holds another sweep \(.*{key}"):
        sweep(arguments.pop("grid"), store=store, progress=False, backend=BACKEND, **arguments)
    assert sorted(p.read_bytes() for p in _parts(store)) == parts, "the refused sweep touched the store"
    # resume=False overwrites it with the new sweep
    arguments = {"grid": GRID, "batch": 4, "seeds": 2, **change}
    grid = arguments.pop("grid")
    result = sweep(grid, store=store, resume=False, progress=False, backend=BACKEND, **arguments)
    pdt.assert_frame_equal(result.frame, sweep(grid, progress=False, backend=BACKEND, **arguments).frame)
    pdt.assert_frame_equal(load(store).frame, result.frame)


def test_a_directory_that_is_not_a_store_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match=r"holds no manifest\.json"):
        sweep(GRID, store=tmp_path, progress=False, backend=BACKEND)
    assert os.listdir(tmp_path) == ["notes.txt"]
    with pytest.raises(StoreError, match="not a vgcore sweep store"):
        load(tmp_path)


def test_damaged_manifest_is_reported(tmp_path):
    store = tmp_path / "s"
    _full_store(store)
    (store / "manifest.json").write_text('{"format": "vgcore.sweep", "identity": ')
    with pytest.raises(StoreError, match=r"manifest\.json is unreadable"):
        load(store)


def test_one_writer_at_a_time(tmp_path):
    identity = {"grid": {"depth": [1]}, "seeds": [0], "batch": 1}
    with Store.open(tmp_path, identity, rows=1, resume=True):
        with pytest.raises(StoreError, match="being written by another sweep"):
            Store.open(tmp_path, identity, rows=1, resume=True)
    Store.open(tmp_path, identity, rows=1, resume=True).close()  # released


def test_write_atomic_leaves_nothing_on_failure(tmp_path):
    (tmp_path / "f").write_bytes(b"old")

    def fail(handle):
        handle.write(b"new, half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(str(tmp_path), "f", fail)
    assert (tmp_path / "f").read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f"]
    write_atomic(str(tmp_path), "f", lambda handle: handle.write(b"new"))
    assert (tmp_path / "f").read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["f"]


def test_parts_carry_the_manifest_identity(tmp_path):
    store = tmp_path / "s"
    result = _full_store(store)
    manifest = Store.read(store).manifest
    assert manifest["identity"] == {"grid": result.grid, "seeds": result.seeds, "batch": 4}
    for part in _parts(store):
        assert pq.read_schema(part).metadata[IDENTITY_KEY] == manifest["identity_sha256"].encode()


# --------------------------------------------------------------------------
# Checksums (issue 17, defect 7): a part whose bytes changed is refused, naming it


def test_defect7_every_byte_flip_in_a_part_is_refused(tmp_path, reference):
    store = tmp_path / "s"
    _full_store(store)
    victim = _parts(store)[1]
    original = victim.read_bytes()
    # a sample of positions over the whole file: header magic, data pages, footer, trailing magic
    positions = sorted({0, 3, len(original) - 1, len(original) - 5, len(original) // 2,
                        *np.random.default_rng(7).integers(0, len(original), 40).tolist()})
    for position in positions:
        for flip in (0x01, 0x80):
            damaged = bytearray(original)
            damaged[position] ^= flip
            victim.write_bytes(bytes(damaged))
            with pytest.raises(StoreError, match=rf"part {victim.name} is damaged or truncated"):
                load(store)
    victim.write_bytes(original)
    pdt.assert_frame_equal(load(store).frame, reference)


def test_defect7_a_part_without_checksum_is_refused_in_a_checksummed_store(tmp_path):
    store = tmp_path / "s"
    _full_store(store)
    part = _parts(store)[0]
    part.rename(store / "part-000001.parquet")  # the bytes are ours, but nothing vouches for them
    with pytest.raises(StoreError, match=r"part-000001\.parquet is foreign \(its name carries no checksum"):
        load(store)


def test_defect7_a_hand_edited_manifest_is_reported_as_edited(tmp_path):
    store = tmp_path / "s"
    _full_store(store)
    path = store / "manifest.json"
    manifest = json.loads(path.read_text())
    for key, value in [("rows", manifest["rows"] + 1), ("identity", {**manifest["identity"], "batch": 5}),
                       ("vgcore_version", "9.9")]:
        edited = {**manifest, key: value}
        if key == "identity":  # even with a consistent identity hash
            edited["identity_sha256"] = identity_hash(value)
        path.write_text(json.dumps(edited))
        for attempt in (lambda: load(store), lambda: _full_store(store)):
            with pytest.raises(StoreError, match=r"manifest\.json was edited by hand or damaged"):
                attempt()
    path.write_text(json.dumps(manifest))
    load(store)


def test_defect7_format_1_stores_without_checksums_are_still_read(tmp_path, reference):
    store = tmp_path / "s"
    _full_store(store)
    manifest = json.loads((store / "manifest.json").read_text())
    del manifest["manifest_sha256"]
    manifest["format_version"] = 1
    (store / "manifest.json").write_text(json.dumps(manifest))
    for part in _parts(store):
        part.rename(store / (part.name[:len("part-000000")] + ".parquet"))
    pdt.assert_frame_equal(load(store).frame, reference)


@pytest.mark.parametrize("make_path", [
    lambda tmp: "",
    lambda tmp: str(tmp / "file" / "sub"),
    lambda tmp: "/proc/vgcore-store",
], ids=["empty", "under-a-file", "proc"])
def test_defect7_store_paths_that_cannot_be_used_are_named(tmp_path, make_path):
    (tmp_path / "file").write_text("a file")
    path = make_path(tmp_path)
    with pytest.raises(StoreError, match=r"^store"):
        sweep(GRID, batch=4, seeds=1, store=path, progress=False, backend=BACKEND)
    if path:
        with pytest.raises(StoreError, match=re.escape(repr(path))):
            sweep(GRID, batch=4, seeds=1, store=path, progress=False, backend=BACKEND)


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs: a disk that fills after a few parts (needs root and mount)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)


def test_defect7_a_full_disk_raises_the_stores_error_and_keeps_earlier_parts(small_disk, reference):
    store = small_disk / "s"
    grid = {**GRID, "sigma_b": [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]}
    with pytest.raises(StoreError, match=rf"store {re.escape(repr(str(store)))}: could not write a part"):
        sweep(grid, batch=4, seeds=2, store=store, chunk_size=1, progress=False, backend=BACKEND)
    assert not _temporaries(store), "the failed write left its temporary file"
    partial = load(store)
    assert 0 < len(partial.frame) < 64
    full = sweep(grid, batch=4, seeds=2, progress=False, backend=BACKEND).frame
    pdt.assert_frame_equal(partial.frame.reset_index(drop=True),
                           full.iloc[partial.rows].reset_index(drop=True))
