"""The filesystem under a run directory: whether it can be written at all, and what a failed
write means. A full disk is a user's problem with a user's fix, but the libraries report it
badly: DeepSpeed's ``torch.save`` raises ``RuntimeError: ... basic_ios::clear: iostream error``
with no errno, so the cause is read from the filesystem itself after the failure."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from bigscale.errors import ConfigError

FULL_BELOW_BYTES = 64 << 20
"""A write that failed while less than this was left free is taken as a full disk: the failed
write itself used up the rest, so a full filesystem shows a few blocks free, not zero."""
_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_WRITE_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)


def mount_point(path: Path) -> Path:
    """The mount point of the filesystem holding ``path`` (or its nearest existing parent)."""
    p = existing_parent(Path(path).absolute())
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return p


def existing_parent(path: Path) -> Path:
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def describe_filesystem(path: Path) -> str:
    """``/mnt/data (device /dev/sdb1, ext4, 12.0 MiB free of 100.0 GiB)``, as much as is known."""
    mount = mount_point(path)
    details = []
    try:
        with open("/proc/mounts") as f:
            for line in f:
                device, where, fstype, *_ = line.split()
                if where == str(mount):
                    details = [f"device {device}", fstype]  # the last line for a mount wins
    except OSError:
        pass
    try:
        st = os.statvfs(mount)
        details.append(
            f"{_size(st.f_bavail * st.f_frsize)} free of {_size(st.f_blocks * st.f_frsize)}"
        )
    except OSError:
        pass
    return f"{mount} ({', '.join(details)})" if details else str(mount)


def free_bytes(path: Path) -> int | None:
    try:
        st = os.statvfs(existing_parent(path))
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def storage_failure(exc: BaseException, path: Path) -> str | None:
    """What a failed write under ``path`` means for the user (a full or read-only filesystem,
    a directory they may not write), or None when it is not the storage's doing."""
    codes = {getattr(e, "errno", None) for e in _chain(exc)}
    where = describe_filesystem(path)
    free = free_bytes(path)
    if codes & set(_SPACE_ERRNOS) or (free is not None and free < FULL_BELOW_BYTES):
        return (
            f"no space left on {where} ({_first_line(exc)}); free space there or point run_dir "
            "at a filesystem with room for a checkpoint"
        )
    if codes & set(_WRITE_ERRNOS):
        return (
            f"{path} cannot be written ({_first_line(exc)}) on {where}; make it writable or "
            "point run_dir at a writable directory"
        )
    return None


def check_writable(path: Path, key: str = "run_dir") -> None:
    """Raise ConfigError unless a file can be created in ``path`` (or, when it does not exist
    yet, in the parent it would be created in). A real write, not ``os.access``: root passes
    permission checks, but not a read-only mount; nothing is left behind."""
    target = existing_parent(path)
    if not target.is_dir():
        raise ConfigError(f"{key}={path}: {target} is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".bigscale-write-test-", dir=target)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        fix = (
            "remount it read-write or"
            if exc.errno == errno.EROFS
            else f"give this user write permission on {target}, or"
        )
        raise ConfigError(
            f"{key}={path} is not writable: {reason} ({target} on {mount_point(target)}); "
            f"{fix} set {key} to a writable directory"
        ) from None


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and e not in seen:
        seen.append(e)
        e = e.__cause__ or e.__context__
    return seen


def _first_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text if len(text) <= 200 else text[:200] + "..."


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"
