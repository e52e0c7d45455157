"""Small shared helpers: seeding (derived seeds, content hashes), atomic file writes."""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from collections.abc import Callable
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
