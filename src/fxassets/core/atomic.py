"""Atomic writes: a file or a whole folder appears complete or not at all (temp name, then rename).

The temp names carry the writer's pid (`.<name>.<pid>-<random>.tmp`), so that what a killed writer left behind is
known for stale and removed by the next atomic folder written beside it (`clear_stale`). Files and folders get the
usual modes (0666 / 0777 less the umask), as any other file would; a write that fails (a full disk, no permission)
leaves nothing behind and names the path it was writing."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# this module's temp names, and tempfile's (`.<name>.<8 random>.tmp`, written before the pid was in the name)
_TEMP = re.compile(r"^\..+\.(?:(\d+)-[0-9a-f]{8}|[a-z0-9_]{8})\.(?:tmp|old)(?:\.\w+)?$")


def _temp_name(path: Path, kind: str) -> Path:
    return path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.{kind}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def clear_stale(folder: Path) -> list[Path]:
    """Remove the temp files and folders in `folder` whose writer is gone (killed); the ones removed."""
    stale = [p for p in (folder.iterdir() if folder.is_dir() else ()) if (m := _TEMP.match(p.name))
             and not (m.group(1) and _alive(int(m.group(1))))]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
    return stale


@contextlib.contextmanager
def _naming(path: Path, tmp: Path) -> Iterator[None]:
    """An OSError without a file name (from a write), naming the temp path, or of a full disk (which a copy blames on
    its source) names `path` instead."""
    try:
        yield
    except OSError as exc:
        if exc.errno is not None and (exc.filename in (None, str(tmp)) or exc.errno in (errno.ENOSPC, errno.EDQUOT)):
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`, on error removed."""
    path = Path(path)
    # the temp name keeps the suffix: writers such as cv2.VideoWriter pick the format by it
    tmp_path = _temp_name(path, f"tmp{path.suffix}")
    try:
        with _naming(path, tmp_path):
            path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask applies
            yield tmp_path
            os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> None:
    write_text(path, "".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in rows))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{i}: not valid JSON: {exc}") from exc
    return rows


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a folder under a temporary name; on success it replaces `path` whole, on error it is removed. What a
    killed earlier run left beside it is removed first."""
    path = Path(path)
    tmp = _temp_name(path, "tmp")
    try:
        with _naming(path, tmp):
            path.parent.mkdir(parents=True, exist_ok=True)
            clear_stale(path.parent)
            tmp.mkdir(0o777)  # the umask applies
            yield tmp
            if path.exists():
                old = _temp_name(path, "old")
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
