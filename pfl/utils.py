"""Small shared helpers: seeding (derived seeds, content hashes), atomic file writes, resume
points."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a CPU ``torch.Generator`` seeded with ``seed``.

    Pass the returned generator to every random draw (STYLE.md, habit 4).
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


SEED_HIGH = 2**62  # derived seeds lie in [0, 2^62): they fit an int64 and torch's manual_seed


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Torch's default dtype is ``dtype`` inside the block and what it was after it.

    For work whose result is recorded in one dtype (a tower's random init, the tiny CLIP's
    pretraining) while ``pfl.setup()`` may have made the process default float64.

    >>> with default_dtype(torch.float64):
    ...     torch.zeros(1).dtype
    torch.float64
    """
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


# Environment flags that cap which CPU kernels compute a float (README, "Same numbers on any CPU").
KERNEL_FLAGS = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA",
                "NPY_DISABLE_CPU_FEATURES", "OPENBLAS_CORETYPE")


def kernel_dispatch() -> dict[str, str]:
    """What selects the CPU kernels here: torch's version, its dispatched instruction set
    (``torch.backends.cpu.get_cpu_capability()``) and those :data:`KERNEL_FLAGS` that are set.

    Two processes with equal dicts run the same kernels on the same inputs; features cached on
    disk are keyed by it (:func:`pfl.run.features.cache_key`), so a store computed under one
    kernel setting (CI's best-kernel pass) is never served to another (its plain-kernel pass).
    """
    found = {"torch": torch.__version__, "capability": torch.backends.cpu.get_cpu_capability()}
    return found | {k: os.environ[k] for k in KERNEL_FLAGS if os.environ.get(k)}


def derive_seed(seed: int, *parts: object) -> int:
    """A seed in ``[0, 2^62)`` that depends only on ``seed`` and ``parts`` (SHA-256 of their text).

    Gives every consumer of one user seed its own independent stream, e.g. one generator per
    module name at init, or one per image content key at inference, so that what one consumer
    draws never shifts what another draws.

    >>> derive_seed(0, "isd") == derive_seed(0, "isd") != derive_seed(0, "rca")
    True
    """
    text = repr((int(seed), *parts)).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") % SEED_HIGH


def generator_for(seed: int, *parts: object) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`derive_seed` ``(seed, *parts)``."""
    return torch.Generator().manual_seed(derive_seed(seed, *parts))


def content_keys(images: torch.Tensor) -> torch.Tensor:
    """One 62-bit key per image ``(N, ...) -> (N,)`` int64: SHA-256 of its values as float32.

    The key identifies an input exactly, so that noise seeded by it depends on the image and
    not on its position in a batch. It hashes the preprocessed pixels, which are computed
    exactly (element-wise from the file's bytes), never a feature of the tower: a float feature
    may differ in its last bit between CPUs, and one bit changes the whole hash. Values are
    cast to float32 first, so a float64 copy of a float32 image has the same key.
    """
    flat = images.detach().to(device="cpu", dtype=torch.float32).reshape(images.shape[0], -1)
    rows = flat.contiguous().numpy()  # hashed through the buffer protocol: no copy per row
    keys = [int.from_bytes(hashlib.sha256(row).digest()[:8], "little") % SEED_HIGH
            for row in rows]
    return torch.tensor(keys, dtype=torch.int64)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Write ``path`` via ``write(tmp_path)`` then rename: a crash never leaves half a file.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = atomic_write(d / "a.txt", lambda p: pathlib.Path(p).write_text("hi"))
    >>> (d / "a.txt").read_text()
    'hi'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        # mkstemp creates 0600 files; give the result the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda p: Path(p).write_text(text))


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- resume points
#
# A resume point is a folder of files that are only meaningful together (weights, optimiser
# state, history, ...). ``write_point`` writes all of them into a fresh hidden folder and then
# publishes that folder with ONE ``os.rename`` to a new name: the next generation number. A
# rename is atomic on POSIX and NTFS, so at any instant a generation folder either does not
# exist or holds the whole point; the previous generation stays until the new one is
# published, and only then is removed. Readers take the highest generation
# (:func:`latest_point`). Names starting with ``.tmp-`` are points being written or discarded;
# they are never read and :func:`remove_stale` deletes them.
#
# Why not a manifest of SHA-256s beside the files: the files would still be replaced one by
# one, so a torn point could only be detected, not avoided, and falling back needs the
# previous point's files kept under other names anyway, which is what generations are.

POINT_TEMP = ".tmp-"  # prefix of a point folder being written or discarded
_GENERATION = re.compile(r"\d{6,}")  # a published point: its generation, zero-padded
_WRITE_TEMP = re.compile(r"\..+\.[A-Za-z0-9_]{8}\.tmp")  # an atomic_write temporary file


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _fsync(path: Path, directory: bool = False) -> None:
    """Flush ``path`` (a file, or a folder's entries) to the disk, so that a published point
    survives a power cut too, not only a killed process."""
    if directory and os.name == "nt":
        return  # Windows cannot open a folder; NTFS journals renames
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    except OSError:
        if not directory:  # some file systems cannot flush a folder: renames are still atomic
            raise
    finally:
        os.close(fd)


def _generations(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = [(int(p.name), p) for p in root.iterdir()
             if p.is_dir() and _GENERATION.fullmatch(p.name)]
    return sorted(found)


def latest_point(root: str | os.PathLike) -> Path | None:
    """The newest complete resume point under ``root`` (a folder), or None when there is none.

    Only :func:`write_point` creates such folders, and only by renaming a finished one, so
    the result is always whole; folders being written (``.tmp-*``) are never returned.
    """
    points = _generations(Path(root))
    return points[-1][1] if points else None


def discard(path: str | os.PathLike) -> None:
    """Remove a file or folder so that no reader ever sees it half deleted: a folder is first
    renamed to a ``.tmp-`` name (atomic), then deleted. No-op if ``path`` does not exist."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        doomed = path.parent / f"{POINT_TEMP}{path.name}.{uuid.uuid4().hex[:8]}"
        os.rename(path, doomed)
        shutil.rmtree(doomed)
    elif path.exists() or path.is_symlink():
        os.remove(path)


def write_point(root: str | os.PathLike, files: Mapping[str, Callable[[str], None]]) -> Path:
    """Write one resume point under ``root`` and publish it atomically; returns its folder.

    ``files`` maps a file name to ``write(path)``, which writes that file (e.g.
    ``lambda p: save_file(tensors, p)``). Every file is written and flushed into a fresh
    ``root/.tmp-*`` folder, which one ``os.rename`` then publishes as ``root/<generation>``
    (the previous generation plus one, zero-padded). Older points are discarded after that
    rename, so a complete point exists at every instant once the first one is published.
    A killed write leaves only a ``.tmp-`` folder (:func:`remove_stale` deletes it).

    >>> import pathlib, tempfile
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> p = write_point(root, {"a.txt": lambda f: pathlib.Path(f).write_text("1")})
    >>> q = write_point(root, {"a.txt": lambda f: pathlib.Path(f).write_text("2")})
    >>> latest_point(root).name, (q / "a.txt").read_text(), p.exists()
    ('000002', '2', False)
    """
    root = Path(root)
    for name in files:
        if not name or Path(name).name != name or name.startswith("."):
            raise ValueError(f"point file names must be plain names, got {name!r}")
    root.mkdir(parents=True, exist_ok=True)
    previous = _generations(root)
    final = root / f"{(previous[-1][0] if previous else 0) + 1:06d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=POINT_TEMP))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 folders
        for name, write in files.items():
            write(str(tmp / name))
            _fsync(tmp / name)
        _fsync(tmp, directory=True)
        os.rename(tmp, final)  # the commit
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync(root, directory=True)
    for _, old in previous:
        discard(old)
    return final


def remove_stale(folder: str | os.PathLike, points: bool = False) -> list[str]:
    """Delete what killed writes left in ``folder`` (not below it): ``.tmp-*`` folders of
    :func:`write_point` and :func:`discard`, temporary files of :func:`atomic_write`, and
    with ``points`` (``folder`` is a root of :func:`write_point`) every point older than the
    newest. Returns the names removed.

    Only one process may write a folder: a temporary file of a write in progress elsewhere
    would be removed too.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    newest = latest_point(folder)
    removed = []
    for p in sorted(folder.iterdir()):
        stale_point = points and _GENERATION.fullmatch(p.name) and p.is_dir() and p != newest
        if p.name.startswith(POINT_TEMP) or _WRITE_TEMP.fullmatch(p.name) or stale_point:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                os.remove(p)
            removed.append(p.name)
    return removed
