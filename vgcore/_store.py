"""The sweep store: a directory of Parquet parts plus a JSON manifest.

Layout of a store directory::

    manifest.json                 what the sweep is: grid, seeds, batch (its "identity"),
                                  with a SHA-256 of its own content
    part-000001-<sha256>.parquet  one finished chunk: rows of the sweep, with their row numbers;
    part-000002-<sha256>.parquet  the name carries the SHA-256 of the file's bytes
    .lock                         held (flock) by the one sweep writing the store
    .*.tmp                        a write in flight; left behind only by a killed run

Crash safety.  Every file (manifest and parts) is written to a temporary file
in the same directory, flushed and fsynced, renamed over its final name with
``os.replace`` (atomic on POSIX and Windows) and the directory is fsynced.  A
part therefore either exists whole under its final name or not at all, so a
run killed at any instant (SIGKILL included) loses at most the chunk it was
writing.  Temporary files are never read; the next sweep into the store
deletes them.  Every row carries its row number (``_row``: its index in the
sweep's enumeration of configs x seeds), a resumed sweep skips the rows
already stored, and a part never replaces another, so no finished row is ever
lost or written twice.

Detection.  Each part's name carries the SHA-256 of its bytes, computed
before they are written and checked, on the bytes read, before anything is
parsed: a part whose bytes changed in any way (a flipped bit, a cut) is
refused as damaged, naming the file.  Each part's Parquet metadata holds the
SHA-256 of the manifest's identity: a part from another sweep (other
identity, other columns, row numbers out of range or repeated) is refused as
foreign, naming the file; so is a part without a checksum in a store of
format 2.  The manifest carries the SHA-256 of its own content, so a manifest
edited by hand is reported as edited.  A manifest of another sweep makes the
store refuse to resume into it.  Stores of format 1 (parts without checksums)
are still read.

Failures of the file system (a full disk, no permission, a path that cannot
be a directory) raise :class:`StoreError` naming the store's path; a part that
could not be written leaves the earlier parts intact.

Only the driver process writes a store; a lock file keeps two sweeps from
writing the same store at once (where ``fcntl`` exists).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
from collections.abc import Callable, Iterator
from typing import Any

MANIFEST = "manifest.json"
FORMAT = "vgcore.sweep"
FORMAT_VERSION = 2
#: Manifest format versions this vgcore reads (1: parts without checksums).
READABLE_VERSIONS = (1, 2)
#: Manifest key of the SHA-256 of the manifest's other content (format 2).
MANIFEST_CHECKSUM = "manifest_sha256"
LOCK = ".lock"
ROW = "_row"
#: Parquet schema-metadata key holding the identity hash of the sweep a part belongs to.
IDENTITY_KEY = b"vgcore.sweep.identity"

_PART = re.compile(r"^part-(\d{6,})(?:-([0-9a-f]{64}))?\.parquet$")
_TEMPORARY_SUFFIX = ".tmp"


class StoreError(ValueError):
    """A store that cannot be used: another sweep's, a damaged or foreign file, in use."""


def identity_hash(identity: dict) -> str:
    """SHA-256 of the canonical JSON of a sweep's identity."""
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _fsync_directory(path: str) -> None:
    """Make a rename inside ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # Windows: directories cannot be opened; renames there are durable on return
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(directory: str, name: str, write: Callable[[Any], None]) -> str:
    """Write ``directory/name`` atomically: ``write(file)`` into a temporary, fsync, rename, fsync dir.

    The temporary file lives in ``directory`` (same file system, so the
    rename is atomic) and is named ``.NAME.*.tmp``.  On any error it is
    removed and the final name is left untouched.
    """
    fd, temporary = _create_temporary(directory, name)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        final = os.path.join(directory, name)
        os.replace(temporary, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise
    _fsync_directory(directory)
    return final


def _create_temporary(directory: str, name: str) -> tuple[int, str]:
    """A new ``.NAME.<random>.tmp`` file in ``directory``, mode 0666 less the umask (mkstemp's is 0600)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        path = os.path.join(directory, f".{name}.{secrets.token_hex(6)}{_TEMPORARY_SUFFIX}")
        try:
            return os.open(path, flags, 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name for {name!r} in {directory!r}")


def _is_temporary(name: str) -> bool:
    return name.startswith(".") and name.endswith(_TEMPORARY_SUFFIX)


class _Lock:
    """An exclusive, non-blocking flock on ``directory/.lock``; released by the OS if the process dies."""

    def __init__(self, directory: str) -> None:
        self._handle = None
        try:
            import fcntl
        except ImportError:  # no flock (Windows): one writer is the caller's responsibility
            return
        handle = open(os.path.join(directory, LOCK), "a+b")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise StoreError(f"store {directory!r} is being written by another sweep (its lock "
                             f"{LOCK} is held); wait for it or use another directory") from None
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the descriptor drops the flock
            self._handle = None


class Store:
    """A sweep store directory (see the module docstring).

    Use :meth:`open` to write (creates, checks the identity, locks, cleans
    temporary files) and :meth:`read` to only read.
    """

    def __init__(self, path: str, manifest: dict, lock: _Lock | None = None) -> None:
        self.path = path
        self.manifest = manifest
        self._lock = lock

    # -- opening ---------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, identity: dict, *, rows: int, resume: bool,
             metadata: dict | None = None) -> Store:
        """Open ``path`` for writing the sweep ``identity`` (``rows`` rows in all).

        A missing or empty directory becomes a new store.  A store of the
        same identity is resumed (``resume=True``) or emptied of its parts
        (``resume=False``).  A store of another identity is refused with
        ``resume=True`` and overwritten with ``resume=False``.  A non-empty
        directory that is not a store is always refused.

        Raises
        ------
        StoreError
            Another sweep's store (with resume), not a store, in use, or a
            damaged manifest.
        """
        path = _check_path(path)
        if os.path.exists(path) and not os.path.isdir(path):
            raise StoreError(f"store: {path!r} exists and is not a directory")
        try:
            return cls._open(path, identity, rows=rows, resume=resume, metadata=metadata)
        except OSError as error:
            raise _file_system_error(path, "cannot be opened for writing", error) from None

    @classmethod
    def _open(cls, path: str, identity: dict, *, rows: int, resume: bool, metadata: dict | None) -> Store:
        os.makedirs(path, exist_ok=True)
        if not os.path.exists(os.path.join(path, MANIFEST)):
            strangers = [name for name in os.listdir(path) if name != LOCK and not _is_temporary(name)]
            if strangers:  # checked before locking, so that nothing is added to someone else's directory
                raise StoreError(f"store: {path!r} is not empty and holds no {MANIFEST} (found "
                                 f"{sorted(strangers)[:3]}); refusing to write a sweep into it")
        lock = _Lock(path)
        try:
            cls._remove_temporaries(path)
            expected = identity_hash(identity)
            manifest_path = os.path.join(path, MANIFEST)
            if os.path.exists(manifest_path):
                manifest = read_manifest(path)
                if manifest["identity_sha256"] != expected:
                    if resume:
                        raise StoreError(
                            f"store {path!r} holds another sweep "
                            f"({_difference(manifest['identity'], identity)}); use another directory, "
                            "or resume=False (--no-resume) to overwrite it")
                    manifest = None
                elif not resume:
                    manifest = None
                if manifest is None:
                    for name in _part_names(path):
                        os.remove(os.path.join(path, name))
                    _fsync_directory(path)
            else:
                manifest = None
            if manifest is None:
                manifest = {
                    "format": FORMAT,
                    "format_version": FORMAT_VERSION,
                    "identity": identity,
                    "identity_sha256": expected,
                    "rows": int(rows),
                    **(metadata or {}),
                }
                manifest[MANIFEST_CHECKSUM] = manifest_checksum(manifest)
                text = json.dumps(manifest, indent=1, sort_keys=True, allow_nan=False).encode()
                write_atomic(path, MANIFEST, lambda handle: handle.write(text))
        except BaseException:
            lock.release()
            raise
        return cls(path, manifest, lock)

    @classmethod
    def read(cls, path: str | os.PathLike) -> Store:
        """Open an existing store read-only (no lock, nothing cleaned)."""
        path = _check_path(path)
        if not os.path.isdir(path):
            raise StoreError(f"store: {path!r} is not a directory")
        return cls(path, read_manifest(path))

    def close(self) -> None:
        """Release the write lock (a no-op for a read-only store)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @staticmethod
    def _remove_temporaries(path: str) -> None:
        for name in os.listdir(path):
            if _is_temporary(name):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(path, name))

    # -- contents -------------------------------------------------------------
    @property
    def identity(self) -> dict:
        return self.manifest["identity"]

    @property
    def rows(self) -> int:
        return int(self.manifest["rows"])

    def part_paths(self) -> list[str]:
        """Paths of the finished parts, in the order written."""
        return [os.path.join(self.path, name) for name in _part_names(self.path)]

    def write_part(self, table) -> str:
        """Write one chunk's rows (a pyarrow Table with a ``_row`` column) as a new part, atomically.

        The Parquet bytes are built in memory, their SHA-256 goes into the
        part's name, then they are written with :func:`write_atomic`.

        Raises
        ------
        StoreError
            The store is read-only, or the file system refused the write (a full
            disk, ...): naming the store's path; earlier parts are untouched.
        """
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self._lock is None:
            raise StoreError(f"store {self.path!r} is open read-only")
        metadata = dict(table.schema.metadata or {})
        metadata[IDENTITY_KEY] = self.manifest["identity_sha256"].encode()
        table = table.replace_schema_metadata(metadata)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        data = sink.getvalue().to_pybytes()
        try:
            existing = [int(_PART.match(name).group(1)) for name in _part_names(self.path)]
            name = f"part-{max(existing, default=0) + 1:06d}-{hashlib.sha256(data).hexdigest()}.parquet"
            return write_atomic(self.path, name, lambda handle: handle.write(data))
        except OSError as error:
            raise _file_system_error(self.path, "could not write a part (the parts written before "
                                     "are intact; resume once the cause is fixed)", error) from None

    def _read_part(self, path: str, columns: list[str] | None, schema) -> Any:
        import pyarrow as pa
        import pyarrow.parquet as pq

        name = os.path.basename(path)
        checksum = _PART.match(name).group(2)
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except OSError as error:
            raise _file_system_error(self.path, f"part {name} cannot be read", error) from None
        if checksum is not None and hashlib.sha256(data).hexdigest() != checksum:
            raise StoreError(f"store {self.path!r}: part {name} is damaged or truncated (the SHA-256 of "
                             "its bytes differs from the checksum in its name: it changed after it was "
                             "written); delete it to recompute its rows")
        try:
            parquet = pq.ParquetFile(pa.BufferReader(data))
            file_schema = parquet.schema_arrow
        except (pa.ArrowException, OSError) as error:
            raise StoreError(f"store {self.path!r}: part {name} is truncated or not a Parquet file "
                             f"({error}); delete it to recompute its rows") from None
        stamp = (file_schema.metadata or {}).get(IDENTITY_KEY)
        if stamp != self.manifest["identity_sha256"].encode():
            raise StoreError(f"store {self.path!r}: part {name} is foreign (it belongs to "
                             f"{'no vgcore sweep' if stamp is None else 'another sweep'}); remove it")
        if checksum is None and self.manifest["format_version"] >= 2:
            raise StoreError(f"store {self.path!r}: part {name} is foreign (its name carries no checksum, "
                             "so this store never wrote it); remove it")
        wanted = schema if columns is None else pa.schema([schema.field(c) for c in columns])
        missing = [f.name for f in wanted if file_schema.get_field_index(f.name) < 0
                   or not file_schema.field(f.name).type.equals(f.type)]
        if missing:
            raise StoreError(f"store {self.path!r}: part {name} is foreign (columns {missing} are "
                             "missing or of another type); remove it")
        try:
            table = parquet.read(columns=[f.name for f in wanted])
        except (pa.ArrowException, OSError) as error:
            raise StoreError(f"store {self.path!r}: part {name} is truncated or damaged ({error}); "
                             "delete it to recompute its rows") from None
        return table.select([f.name for f in wanted]).cast(wanted)

    def iter_parts(self, schema, columns: list[str] | None = None) -> Iterator[tuple[str, Any]]:
        """(path, table) for every part, each checked (see the module docstring)."""
        for path in self.part_paths():
            yield path, self._read_part(path, columns, schema)

    def read_table(self, schema, columns: list[str] | None = None):
        """Every stored row (``columns`` of ``schema``, ``_row`` included), sorted by ``_row``.

        Raises
        ------
        StoreError
            Naming a truncated or foreign part, including one whose row numbers
            lie outside the sweep or repeat rows of another part.
        """
        import numpy as np
        import pyarrow as pa

        if columns is not None and ROW not in columns:
            columns = [ROW, *columns]
        tables, seen = [], np.zeros(self.rows, dtype=bool)
        for path, table in self.iter_parts(schema, columns):
            rows = table.column(ROW).to_numpy()
            name = os.path.basename(path)
            if rows.size and (rows.min() < 0 or rows.max() >= self.rows):
                raise StoreError(f"store {self.path!r}: part {name} is foreign (row numbers outside "
                                 f"0..{self.rows - 1}); remove it")
            if np.unique(rows).size != rows.size or seen[rows].any():
                raise StoreError(f"store {self.path!r}: part {name} repeats rows already stored "
                                 "(two sweeps wrote this store?); remove it")
            seen[rows] = True
            tables.append(table)
        wanted = schema if columns is None else pa.schema([schema.field(c) for c in columns])
        if not tables:
            return wanted.empty_table()
        table = pa.concat_tables(tables)
        return table.sort_by(ROW)


def read_manifest(path: str) -> dict:
    """The manifest of the store at ``path``, checked to be a vgcore sweep manifest."""
    manifest_path = os.path.join(path, MANIFEST)
    try:
        with open(manifest_path, "rb") as handle:
            manifest = json.loads(handle.read())
    except FileNotFoundError:
        raise StoreError(f"store: {path!r} holds no {MANIFEST}; not a vgcore sweep store") from None
    except (OSError, ValueError) as error:
        raise StoreError(f"store {path!r}: {MANIFEST} is unreadable ({error})") from None
    if (not isinstance(manifest, dict) or manifest.get("format") != FORMAT
            or not isinstance(manifest.get("identity"), dict) or "rows" not in manifest):
        raise StoreError(f"store {path!r}: {MANIFEST} is not a vgcore sweep manifest")
    version = manifest.get("format_version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise StoreError(f"store {path!r}: format version {version!r} is not supported (this vgcore "
                         f"reads versions {', '.join(map(str, READABLE_VERSIONS))})")
    if version >= 2 and manifest.get(MANIFEST_CHECKSUM) != manifest_checksum(manifest):
        raise StoreError(f"store {path!r}: {MANIFEST} was edited by hand or damaged (its content no longer "
                         f"matches its own checksum {MANIFEST_CHECKSUM}); restore it, or start the sweep "
                         "afresh in another directory")
    try:
        identity_ok = manifest.get("identity_sha256") == identity_hash(manifest["identity"])
    except (TypeError, ValueError):  # not JSON-able as written (NaN): not what a sweep writes
        identity_ok = False
    if not identity_ok:
        raise StoreError(f"store {path!r}: {MANIFEST} is damaged or edited (its identity hash does not "
                         "match)")
    if isinstance(manifest["rows"], bool) or not isinstance(manifest["rows"], int) or manifest["rows"] < 0:
        raise StoreError(f"store {path!r}: {MANIFEST} is damaged or edited (rows: {manifest['rows']!r})")
    return manifest


def manifest_checksum(manifest: dict) -> str:
    """SHA-256 of the canonical JSON of a manifest without its own checksum entry."""
    content = {key: value for key, value in manifest.items() if key != MANIFEST_CHECKSUM}
    try:
        text = json.dumps(content, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError):
        return ""  # never a valid checksum
    return hashlib.sha256(text.encode()).hexdigest()


def _check_path(path: Any) -> str:
    """The store's path as a non-empty string (str or os.PathLike)."""
    if not isinstance(path, (str, os.PathLike)):
        raise StoreError(f"store: expected a directory path, got {type(path).__name__}")
    path = os.fspath(path)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not path:
        raise StoreError("store: the path is empty; give a directory")
    if "\0" in path:
        raise StoreError(f"store: {path!r} contains a NUL character")
    return path


def _file_system_error(path: str, what: str, error: OSError) -> StoreError:
    """A StoreError naming the store's path (and the file, if another) for an OSError."""
    reason = error.strerror or str(error) or type(error).__name__
    where = f" ({error.filename})" if error.filename and os.fspath(error.filename) != path else ""
    return StoreError(f"store {path!r}: {what}: {reason}{where}")


def _part_names(path: str) -> list[str]:
    return sorted(name for name in os.listdir(path) if _PART.match(name))


def _difference(stored: dict, wanted: dict) -> str:
    """A short account of how two identities differ, for error messages."""
    notes = []
    for key in sorted(set(stored) | set(wanted)):
        a, b = stored.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            notes += [f"{key}[{sub!r}]: stored {a.get(sub)!r}, now {b.get(sub)!r}"
                      for sub in sorted(set(a) | set(b)) if a.get(sub) != b.get(sub)]
        elif a != b:
            notes.append(f"{key}: stored {a!r}, now {b!r}")
    text = "; ".join(notes[:3]) or "its identity differs"
    return text if len(text) < 400 else text[:397] + "..."
