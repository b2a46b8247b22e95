"""A run directory as one writer's workspace: its lock, durable file writes, checksums, sweeping.

- ``RunLock``: an exclusive ``fcntl.flock`` on ``RUN/.lock``, held by the training process for
  the whole run, so a second trainer pointed at the same directory is refused with one line
  naming the holder's pid. The kernel drops a flock when its process dies, so the lock file a
  killed run leaves behind blocks nobody; the file itself is never deleted (unlinking a lock
  file lets a waiter lock an orphaned inode while a newcomer locks a fresh one).
- ``write_durable``/``atomic_write``/``atomic_folder``: the one way this package writes a file.
  Files are written with ``os.open(..., 0o666)`` (the kernel applies the user's umask, as
  ``open()`` in any other tool does), flushed and fsync'ed; ``atomic_write`` (and
  ``atomic_write_text``) writes a temporary file and renames it over the target, ``atomic_folder``
  writes a whole folder under a temporary name and renames it into place.
- Manifests: a checkpoint folder carries ``manifest.json`` with the size and SHA-256 of each of
  its files, computed from the bytes handed to the disk and written before the rename that
  publishes the folder; ``verify`` re-hashes the files and names the first one that differs.
- Temporary names carry the writer's pid (``.tmp-PID-TOKEN-WHAT``, ``.del-PID-TOKEN-WHAT``), so
  ``sweep_temporaries`` removes only leftovers of this process or of processes that are gone.
- Symbolic links: no file is written through a link found in a directory this package writes
  (a run, an export, RUN/eval, RUN/samples), since a planted link could point at any file of the
  user's. Files opened in place (the lock, ``log.jsonl``, ``eval/periodic.jsonl``) are opened with
  ``O_NOFOLLOW`` (``open_nofollow``, ``open_append``): a link there is a one-line UserError naming
  it. ``atomic_write`` creates its temporary with ``O_EXCL | O_NOFOLLOW`` and renames it over the
  target, and a rename replaces a link itself, never its target: a link at the destination is
  replaced by the new file (the file it pointed to is left as it was). Folders of a run the
  package writes into (``own_dir``: samples/, eval/, tb/) are refused when they are links.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import shutil
from pathlib import Path

from ..errors import UserError

MANIFEST = "manifest.json"
LOCK = ".lock"
_OWNED_RE = re.compile(r"^\.(?:tmp|del)-(\d+)-[0-9a-f]+-")
# Other temporary names a run directory may hold: tempfile's mkdtemp/mkstemp names for a checkpoint
# folder or config.json, which a run written by ddpm 0.0.x can hold; swept like ours.
_FOREIGN_RE = re.compile(r"^\.tmp-ckpt-|^\.config\.json\.")
# errno values that mean "this machine's resources or permissions", reported as one line.
RESOURCE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO,
                   errno.ENOTDIR}
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # (Windows has none; creating a link there needs privileges)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def temp_name(what: str, kind: str = "tmp") -> str:
    """``.tmp-PID-TOKEN-what``: hidden, unique, and traceable to the process that made it."""
    return f".{kind}-{os.getpid()}-{secrets.token_hex(4)}-{what}"


def is_temporary(name: str) -> bool:
    """Whether ``name`` is one of the temporaries a writer leaves in a run directory (ours, or the
    ``tempfile`` names of ddpm 0.0.x), which ``sweep_temporaries`` removes."""
    return bool(_OWNED_RE.match(name) or _FOREIGN_RE.match(name))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def sweep_temporaries(run_dir: Path) -> None:
    """Delete temporary files and folders in ``run_dir`` left by this process or by dead ones
    (a kill during a save or a rotation); those of a live process are left alone."""
    for p in Path(run_dir).iterdir():
        m = _OWNED_RE.match(p.name)
        if m:
            pid = int(m.group(1))
            if pid != os.getpid() and _pid_alive(pid):
                continue
        elif not _FOREIGN_RE.match(p.name):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def retire(path: Path) -> None:
    """Delete a folder by renaming it to a ``.del-`` name first (atomic), so a kill midway leaves
    a temporary that the next sweep removes, never a half-deleted folder under its real name. A
    symbolic link is removed itself (rmtree would refuse it and leave it behind)."""
    if os.path.islink(path):
        os.unlink(path)
        return
    gone = path.with_name(temp_name(path.name, "del"))
    os.replace(path, gone)
    shutil.rmtree(gone, ignore_errors=True)


# -- symbolic links --------------------------------------------------------------------------------

def refuse_link(path: str | os.PathLike) -> None:
    """A one-line UserError when ``path`` is a symbolic link (dangling or not): see the module docstring."""
    if os.path.islink(path):
        try:
            target = f" (to {os.readlink(path)})"
        except OSError:
            target = ""
        raise UserError(f"{path} is a symbolic link{target}; ddpm writes no file through a link in a directory it "
                        f"writes, as it could point anywhere: remove the link")


def open_nofollow(path: str | os.PathLike, flags: int, mode: int = 0o666) -> int:
    """``os.open`` that does not follow a symbolic link at ``path`` (``O_NOFOLLOW``): a link is a
    one-line UserError naming it, never a write to the file it points to."""
    try:
        return os.open(path, flags | _NOFOLLOW | _CLOEXEC, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a link (or a loop of links above it)
            refuse_link(path)
        raise


def open_append(path: str | os.PathLike):
    """``path`` opened for appending UTF-8 text, created if missing (the umask applies), never
    through a symbolic link (``open_nofollow``)."""
    return os.fdopen(open_nofollow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "a", encoding="utf-8")


def own_dir(path: str | os.PathLike) -> Path:
    """A folder this package writes into inside a run (samples/, eval/, tb/), created if missing;
    a symbolic link in its place is refused (``refuse_link``) rather than written through."""
    path = Path(path)
    refuse_link(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_fd(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_durable(path: Path, data: bytes) -> str:
    """Create ``path`` (which must not exist) holding ``data``, fsync it; return its SHA-256."""
    # O_EXCL fails on any existing name, a link included; O_NOFOLLOW says so once more.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o666)
    try:
        _write_fd(fd, data)
        os.fsync(fd)
    except OSError as exc:  # os.write does not say which file: a full disk should
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    finally:
        os.close(fd)
    return hashlib.sha256(data).hexdigest()


def atomic_write(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file in the same folder, fsync and rename: a
    reader sees the old file or the new one, never a part. A symbolic link at ``path`` is replaced
    by the file, not written through (the rename replaces the link itself)."""
    path = Path(path)
    tmp = path.with_name(temp_name(path.name))
    try:
        write_durable(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_npz(path: str | os.PathLike, *, compressed: bool = True, **arrays) -> Path:
    """``numpy.savez`` (``savez_compressed`` when ``compressed``) of ``arrays`` written as
    ``atomic_write`` writes: whole or not at all, never through a link."""
    import io

    import numpy as np

    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
    return atomic_write(path, buffer.getvalue())


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """``atomic_write`` of ``text`` in UTF-8."""
    return atomic_write(path, text.encode("utf-8"))


def atomic_folder(final: Path, files: dict[str, bytes]) -> dict[str, tuple[int, str]]:
    """Publish the folder ``final`` holding ``files`` (relative path -> bytes, written in that
    order): written and fsync'ed under a temporary name beside it, then renamed into place, an
    existing ``final`` retired first. Returns each file's (size, SHA-256)."""
    final = Path(final)
    tmp = final.with_name(temp_name(final.name))
    os.mkdir(tmp, 0o777)  # the umask applies, as to every file below
    try:
        digests = {}
        for name, data in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            digests[name] = (len(data), write_durable(tmp / name, data))
        for folder in {(tmp / name).parent for name in files}:
            fsync_dir(folder)
        if final.exists() or final.is_symlink():  # a link is removed, never followed
            retire(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(final.parent)
    return digests


# -- checksums ----------------------------------------------------------------------------------

def manifest_text(step: int, digests: dict[str, tuple[int, str]]) -> str:
    files = {name: {"bytes": size, "sha256": sha} for name, (size, sha) in digests.items()}
    return json.dumps({"format": "ddpm-checkpoint/1", "step": step, "files": files}, indent=1) + "\n"


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in chunks (checkpoint manifests, FID weights and references)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def verify(folder: Path, names, optional=()) -> str | None:
    """None when ``names`` in ``folder`` match its manifest (or it has none: checkpoints written
    before manifests existed load unverified); else what is wrong, e.g. ``"ema.safetensors:
    SHA-256 mismatch"``. Each of ``optional`` (a file only some checkpoints hold) is verified too
    where the manifest lists it or the folder holds it."""
    manifest = Path(folder) / MANIFEST
    if not manifest.is_file():
        return None
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
        held = [name for name in optional if name in files or os.path.lexists(Path(folder) / name)]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST}: unreadable"
    for name in [*names, *held]:
        entry, path = files.get(name), Path(folder) / name
        if not isinstance(entry, dict):
            return f"{name}: not in {MANIFEST}"
        if not path.is_file() or path.stat().st_size != entry.get("bytes"):
            return f"{name}: size differs from {MANIFEST} (truncated or replaced)"
        if sha256_file(path) != entry.get("sha256"):
            return f"{name}: SHA-256 mismatch"
    return None


# -- the lock -----------------------------------------------------------------------------------

class RunLock:
    """Exclusive lock of one run directory for one training process (context manager).

    Creates the directory if needed. On entry a run locked by another live process raises a
    UserError naming it and its pid; on exit (or when the process dies) the lock is released.
    Where the file system offers no locks (some network mounts), training goes on unlocked.
    """

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.fd: int | None = None
        self.created = False

    def __enter__(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks here
            return self
        self.created = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / LOCK
        fd = open_nofollow(path, os.O_RDWR | os.O_CREAT)  # a planted link would have us truncate its target
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip()
            os.close(fd)
            who = f"process {holder}" if holder.isdigit() else "another process"
            raise UserError(f"{self.run_dir} is in use by {who} (another ddpm train writes to it); wait for it "
                            f"to finish or stop it, or choose another --out") from None
        except OSError:  # ENOLCK/EOPNOTSUPP: no locking on this file system
            os.close(fd)
            return self
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            if self.created and os.listdir(self.run_dir) == [LOCK]:  # a run that failed to start leaves no trace
                (self.run_dir / LOCK).unlink()
                self.run_dir.rmdir()
            os.close(self.fd)  # closing the last descriptor releases the flock
            self.fd = None
