"""The output folder of an audit: which ``--out`` may be replaced, and writing it whole or not at all.

``--out`` must be new, empty, or an earlier audit's folder (:func:`check_out`, recognised by :data:`MARKER`), and
neither the image folder nor inside or around it. :func:`staged` holds a lock on ``--out``, lets the audit write
into a staging folder next to it and moves that into place at the end, so a failed, terminated or concurrent run
leaves no half report and an old ``report.json`` never survives next to new maps.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["MARKER", "OutputFolderError", "check_out", "staged"]

#: The file an audit writes into its ``--out``: a folder holding it (and nothing else the audit did not write) may
#: be replaced by the next audit; any other non-empty folder is refused.
MARKER = ".lightning-interp-audit"


class OutputFolderError(ValueError):
    """``--out`` cannot be written without destroying files that are not an earlier audit's (nothing was touched)."""


def _inside(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder and path != folder


def check_out(out: str | os.PathLike, images: str | os.PathLike | None = None) -> None:
    """Refuse an ``--out`` whose replacement would destroy anything an audit did not write.

    Accepted: a path that does not exist, an empty folder, or a folder an earlier audit wrote (it holds
    :data:`MARKER`, and no entry the marker does not list). Refused: a file, a symbolic link, any other folder,
    and an ``--out`` equal to, inside or containing ``images``.

    Raises:
        OutputFolderError: one line naming ``--out`` and what to do; nothing was touched.
    """
    out = os.fspath(out)
    real = os.path.realpath(out)
    if images is not None:
        real_images = os.path.realpath(os.fspath(images))
        relation = (
            "is" if real == real_images
            else "is inside" if _inside(real, real_images)
            else "contains" if _inside(real_images, real)
            else None
        )  # fmt: skip
        if relation is not None:
            why = (
                "the next audit would read this one's figures as images" if relation == "is inside"
                else "the audit replaces --out as a whole and would delete the images"
            )  # fmt: skip
            raise OutputFolderError(
                f"--out {out} {relation} the image folder --images {os.fspath(images)}: {why}; choose an output folder "
                "outside the images (nothing was written)"
            )
    if not os.path.lexists(out):
        ancestor = os.path.dirname(os.path.abspath(out))
        while not os.path.lexists(ancestor):
            ancestor = os.path.dirname(ancestor)
        if not os.path.isdir(ancestor):
            raise OutputFolderError(f"--out {out} lies under {ancestor}, which is a file, not a folder (nothing was written)")
        return
    if os.path.islink(out):
        raise OutputFolderError(f"--out {out} is a symbolic link: give the folder itself, or a new path (nothing was written)")
    if not os.path.isdir(out):
        raise OutputFolderError(f"--out {out} is a file, not a folder: give a new folder name (nothing was written)")
    entries = sorted(os.listdir(out))
    if not entries:
        return
    marker = os.path.join(out, MARKER)
    written: set[str] | None = None
    if os.path.isfile(marker):
        try:
            with open(marker) as f:
                written = set(json.load(f).get("entries", [])) | {MARKER}
        except (OSError, ValueError, AttributeError):
            written = None
    if written is None:
        raise OutputFolderError(
            f"--out {out} is a folder with {len(entries)} entries (e.g. {entries[:3]}) that no audit wrote, and the "
            "audit replaces --out as a whole: give a new or empty folder, or the --out of an earlier audit (nothing was "
            "written)"
        )
    others = [e for e in entries if e not in written]
    if others:
        raise OutputFolderError(
            f"--out {out} is an earlier audit's folder, but {others[:3]} were added since and would be deleted: move "
            "them out, or give another --out (nothing was written)"
        )


def _hidden_name(out: str, kind: str) -> str:
    """A hidden sibling of ``out`` named after it: ``.NAME.audit-<kind>-<pid>-<random>``."""
    parent, base = os.path.split(os.path.abspath(out))
    return os.path.join(parent, f".{base}.audit-{kind}-{os.getpid()}-{secrets.token_hex(4)}")


@contextmanager
def _out_lock(out: str) -> Iterator[None]:
    """Hold ``.NAME.audit-lock`` next to ``out``: a second audit into the same ``--out`` fails at once.

    ``flock`` is released by the kernel when the process dies (SIGKILL included), so a stale lock file never
    blocks a later run; the file is removed on release, and a run that locked a file removed meanwhile retries.
    """
    try:
        import fcntl
    except ModuleNotFoundError:  # not POSIX: no lock (concurrent audits into one --out are then the user's to avoid)
        yield
        return
    parent, base = os.path.split(os.path.abspath(out))
    path = os.path.join(parent, f".{base}.audit-lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputFolderError(
                f"--out {out}: another audit is writing into it now (lock {path}); wait for it to finish, or give "
                "another --out (nothing was written)"
            ) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder before us removed the file after we opened it: lock the new one
    try:
        yield
    finally:
        try:
            os.unlink(path)
        finally:
            os.close(fd)


def _remove_stale(out: str) -> None:
    """Remove the staging and old folders of ``out`` that a killed run left (under the lock: none is in use)."""
    parent, base = os.path.split(os.path.abspath(out))
    if not os.path.isdir(parent):
        return
    for name in os.listdir(parent):
        if name.startswith((f".{base}.audit-staging-", f".{base}.audit-old-")):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


@contextmanager
def _terminate_as_exit() -> Iterator[None]:
    """Turn SIGTERM into ``SystemExit`` during the audit, so that its staging folder is removed on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _new_staging(out: str) -> str:
    """A fresh staging folder next to ``out``, with the umask's permissions (``mkdtemp`` would make it 0700)."""
    path = _hidden_name(out, "staging")
    os.mkdir(path)
    return path


def _write_marker(staging: str, source: str) -> None:
    entries = sorted(os.listdir(staging))
    with open(os.path.join(staging, MARKER), "w") as f:
        json.dump({"written_by": "lightning-interp audit", "model": source, "entries": entries}, f, indent=1)


def _publish(staging: str, out: str) -> None:
    """Replace ``out`` by ``staging`` (an old report never survives next to new files); call under the lock."""
    old = None
    if os.path.lexists(out):
        old = _hidden_name(out, "old")
        os.rename(out, old)
    try:
        os.rename(staging, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)  # put the earlier report back: nothing lost
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged(out: str, source: str) -> Iterator[str]:
    """Lock ``out``, clear what killed runs left, stage into a fresh folder and publish it when the body succeeds."""
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    with _out_lock(out), _terminate_as_exit():
        check_out(out)  # again under the lock: another audit may have written it since the first check
        _remove_stale(out)
        staging = _new_staging(out)
        try:
            yield staging
            _write_marker(staging, source)
            _publish(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
