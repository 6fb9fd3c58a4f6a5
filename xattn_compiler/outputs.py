"""Where xattn-compiler may write, and how: the one place that decides and does it.

Every file a command writes (a model and its ``.data``, a report, a reproducer, a manifest)
passes :meth:`Guard.check` and is written atomically:

* never the input model, nor any external data file it refers to, through any spelling,
  symlink or hard link (a :class:`Guard` holds them by resolved path and by inode);
* never over an existing file that is not a regular file (``-o /dev/null`` as root would
  replace the device with a file; a FIFO or a folder is refused the same way);
* never in place: the bytes go to a temporary file beside the target, which replaces the
  target only once complete, so a failure (a full disk, a check that did not hold) leaves
  the previous file as it was and no temporary file behind.

Outputs made of several files (a model and its data; the projector, decoder and manifest of
``split-kv``) are written to a hidden staging folder beside the targets and committed
together by :meth:`Staging.commit`; :func:`save_checked` stages a model, lets a check read
it back from disk, and commits only if the check passes.

A command guards its inputs once with :func:`protecting`; every write inside it (including
those of library code such as the pass manager's reproducer) is checked against them.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import OutputError

log = logging.getLogger(__name__)

PathLike = str | os.PathLike


@dataclass(frozen=True)
class _Protected:
    why: str
    path: Path  # resolved
    identity: tuple[int, int] | None  # (st_dev, st_ino) when the file exists


class Guard:
    """The files a run must not write: its input models and every external data file each
    refers to (``<model>.data`` always, whether or not the model names it)."""

    def __init__(self, models: Iterable[PathLike] = ()):
        self._items: list[_Protected] = []
        for model in models:
            self.add_model(model)

    def add_model(self, model: PathLike) -> None:
        model = Path(model)
        self._add("the input model", model)
        why = f"external data of the input {model}"
        self._add(why, model.with_name(model.name + ".data"))
        for location in _external_locations(model):
            self._add(why, model.parent / location)

    def _add(self, why: str, path: Path) -> None:
        self._items.append(_Protected(why, _resolve(path), _identity(path)))

    def protects(self, path: PathLike) -> str | None:
        """Why ``path`` must not be written, or None."""
        resolved, identity = _resolve(Path(path)), _identity(Path(path))
        for item in self._items:
            if resolved == item.path or (identity is not None and identity == item.identity):
                return item.why
        return None


def same_file(a: PathLike, b: PathLike) -> bool:
    """Whether two paths name one file (one resolved path, or one inode: a hard link)."""
    a, b = Path(a), Path(b)
    identity = _identity(a)
    return _resolve(a) == _resolve(b) or (identity is not None and identity == _identity(b))

    def __iter__(self) -> Iterator[_Protected]:
        return iter(self._items)


_ACTIVE: contextvars.ContextVar[tuple[Guard, ...]] = contextvars.ContextVar(
    "xattn_output_guards", default=())


@contextlib.contextmanager
def protecting(*models: PathLike) -> Iterator[Guard]:
    """While inside: every write through this module refuses ``models`` and their data."""
    guard = Guard(models)
    token = _ACTIVE.set(_ACTIVE.get() + (guard,))
    try:
        yield guard
    finally:
        _ACTIVE.reset(token)


def check(path: PathLike, protect: Iterable[PathLike] | Guard = ()) -> Path:
    """Raise :class:`OutputError` unless ``path`` may be written; return it as a Path.

    Refused: a file of the active :func:`protecting` guards or of ``protect`` (model paths
    or a :class:`Guard`), and an existing target that is not a regular file.
    """
    path = Path(path)
    guards = [*_ACTIVE.get(), as_guard(protect)]
    for guard in guards:
        why = guard.protects(path)
        if why is not None:
            raise OutputError(f"{path}: refusing to write over {why}")
    kind = _non_regular_kind(path)
    if kind is not None:
        raise OutputError(f"{path}: is {kind}, not a regular file; refusing to replace it")
    return path


def as_guard(protect: Iterable[PathLike] | PathLike | Guard) -> Guard:
    """``protect`` as a :class:`Guard` (model paths, one path, or a Guard already built:
    building one reads each model's external data locations, so build it once per write)."""
    if isinstance(protect, Guard):
        return protect
    if isinstance(protect, (str, os.PathLike)):
        return Guard([protect])
    return Guard(protect)


def _non_regular_kind(path: Path) -> str | None:
    try:
        mode = os.stat(path).st_mode  # through a symlink: what it points to is what we'd hit
    except (FileNotFoundError, NotADirectoryError):
        return None  # nothing there yet (making its folder reports a file in the way)
    except OSError as exc:
        raise OutputError(f"{path}: cannot check the output ({exc.strerror or exc})") from exc
    if stat.S_ISREG(mode):
        return None
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a regular file"


# --- one file -------------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_path(path: PathLike, protect: Iterable[PathLike] | Guard = ()) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; once the block has written it completely, it
    replaces ``path``. On any failure the temporary file is removed and ``path`` is left as
    it was; an ``OSError`` becomes an :class:`OutputError` naming ``path``."""
    protect = as_guard(protect)
    path = check(path, protect)
    tmp: Path | None = None
    try:
        _make_parent(path)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        yield tmp
        _fsync(tmp)
        check(path, protect)  # it may have changed while we wrote
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise _output_error(path, exc) from exc
    finally:
        if tmp is not None:
            _remove(tmp)


def write_bytes(path: PathLike, data: bytes, protect: Iterable[PathLike] | Guard = ()) -> Path:
    with atomic_path(path, protect) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return Path(path)


def write_text(path: PathLike, text: str, protect: Iterable[PathLike] | Guard = ()) -> Path:
    return write_bytes(path, text.encode("utf-8"), protect)


def write_json(path: PathLike, data: Any, protect: Iterable[PathLike] | Guard = ()) -> Path:
    return write_text(path, json.dumps(data, indent=2, default=str) + "\n", protect)


# --- several files, committed together ------------------------------------------------------

class Staging:
    """Files written under a hidden folder beside their targets (same file system, so each
    move is a rename), moved into place together by :meth:`commit`."""

    def __init__(self, folder: Path, stage: Path, protect: Guard):
        self.folder = folder
        self.stage = stage
        self._protect = protect

    def path(self, name: str) -> Path:
        """Where to write the file that becomes ``folder/name``; checks ``folder/name`` now,
        so a refused target fails before any work is done."""
        if Path(name).name != name:
            raise ValueError(f"a staged name is a plain file name, not {name!r}")
        check(self.folder / name, self._protect)
        return self.stage / name

    def commit(self) -> list[Path]:
        """Move every staged file to its target and return the targets.

        Data files move first, models next, manifests (``.json``) last, so that a reader
        never finds a new model pointing into old data. Each replaced target is kept (as a
        hard link) until all moves are done; if one fails, the earlier ones are undone.
        """
        names = sorted((p.name for p in self.stage.iterdir() if p.is_file()), key=_commit_rank)
        targets = [check(self.folder / name, self._protect) for name in names]
        for name in names:
            _fsync(self.stage / name)
        backups = self.stage / ".previous"
        backups.mkdir()
        done: list[tuple[Path, Path | None]] = []
        try:
            for name, target in zip(names, targets, strict=True):
                done.append((target, _keep_previous(target, backups / name)))
                os.replace(self.stage / name, target)
        except OSError as exc:
            _undo(done)
            raise _output_error(target, exc) from exc
        _fsync_dir(self.folder)
        return targets


def _commit_rank(name: str) -> tuple[int, str]:
    if name.endswith(".json"):
        return 2, name
    if name.endswith(".onnx"):
        return 1, name
    return 0, name


def _keep_previous(target: Path, backup: Path) -> Path | None:
    try:
        os.link(target, backup)
    except FileNotFoundError:
        return None
    except OSError:  # no hard links here: the commit still happens, without an undo
        log.debug("cannot keep %s while committing; a failed commit cannot undo it", target)
        return None
    return backup


def _undo(done: list[tuple[Path, Path | None]]) -> None:
    for target, backup in reversed(done):
        try:
            if backup is not None:
                os.replace(backup, target)
        except OSError as exc:
            log.error("could not restore %s after a failed write: %s", target, exc)


@contextlib.contextmanager
def staged(folder: PathLike, protect: Iterable[PathLike] | Guard = (),
           name: PathLike | None = None) -> Iterator[Staging]:
    """A :class:`Staging` beside ``folder``'s targets; whatever was not committed when the
    block ends (an error, a failed check) is removed, and no target has been touched.
    An ``OSError`` becomes an :class:`OutputError` naming ``name`` (default: ``folder``)."""
    folder = Path(folder)
    guard = as_guard(protect)
    stage: Path | None = None
    try:
        _make_folder(folder)
        stage = Path(tempfile.mkdtemp(prefix=".xattn-staging-", dir=folder))
        yield Staging(folder, stage, guard)
    except OSError as exc:
        raise _output_error(Path(name or folder), exc) from exc
    finally:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)


def save_checked(model: Any, path: PathLike, check_saved: Callable[[Path], None] | None = None,
                 *, protect: Iterable[PathLike] | Guard = (), **save_options: Any) -> Path:
    """Save ``model`` (``io.save`` options apply) so that ``path`` changes only if
    ``check_saved`` accepts the files as written.

    The model (and its ``.data``) is written to a staging folder beside ``path``;
    ``check_saved`` gets the staged model's path (load it from there: the files are complete
    and final) and raises to refuse it (:class:`~xattn_compiler.errors.CheckFailed` for a
    mismatch). Then the files replace any earlier ones together.
    """
    from .io import save

    path, protect = Path(path), as_guard(protect)
    with staged(path.parent, protect, name=path) as stage:
        staged_model = stage.path(path.name)
        stage.path(path.name + ".data")  # checked before the work, like the model
        save(model, staged_model, protect=protect, **save_options)
        if check_saved is not None:
            check_saved(staged_model)
        stage.commit()
    return path


# --- plumbing -------------------------------------------------------------------------------

def _resolve(path: Path) -> Path:
    try:
        return Path(os.path.realpath(path))
    except (OSError, ValueError):
        return Path(os.path.abspath(path))


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except (OSError, ValueError):
        return None
    return info.st_dev, info.st_ino


def _external_locations(model_path: Path) -> set[str]:
    """External data files a model refers to; empty when it is not a readable ONNX file.

    A model with external data has a small protobuf, so one larger than the limit below holds
    its weights inline and is not parsed again just to find none.
    """
    import onnx
    from google.protobuf.message import DecodeError
    from onnx import external_data_helper

    from .ir import iter_tensors

    try:
        if not model_path.is_file() or model_path.stat().st_size > 64 * 2**20:
            return set()
        model = onnx.load_model(str(model_path), load_external_data=False)
    except (OSError, DecodeError, RuntimeError, ValueError):
        return set()
    locations = set()
    for tensor in iter_tensors(model):
        if external_data_helper.uses_external_data(tensor):
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            if location:
                locations.add(location)
    return locations


def _make_parent(path: Path) -> None:
    _make_folder(path.parent)


def _make_folder(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder}: cannot write there (not a directory)")
    folder.mkdir(parents=True, exist_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    # Makes the renames durable; not every platform or file system can open a folder.
    with contextlib.suppress(OSError):
        _fsync(folder)


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def _output_error(path: Path, exc: OSError) -> OutputError:
    return OutputError(f"{path}: cannot write ({exc.strerror or exc})")
