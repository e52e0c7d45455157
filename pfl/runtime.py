"""Process settings that a stored result depends on, applied in one call: :func:`setup`.

Every notebook starts with ``profile = pfl.setup()`` and the command line calls it before
anything else, so a notebook run in JupyterLab, under ``pytest --nbval`` or through ``make``
gives the same numbers (no reliance on environment variables set by a Makefile).
"""

from __future__ import annotations

import torch
from threadpoolctl import threadpool_limits

from pfl.config import Profile, active

DTYPES = {"float64": torch.float64, "float32": torch.float32}


def setup(profile: Profile | str | None = None, *, threads: int | None = None) -> Profile:
    """Apply ``profile.numerics`` to this process and return the profile.

    Args:
        profile: a :class:`~pfl.config.Profile`, a profile name, or None for
            ``$PFL_PROFILE`` (default ``smoke``).
        threads: intra-op CPU threads; None takes ``profile.numerics.threads``.

    Sets torch's default dtype (float64 in the smoke profile: see
    :class:`~pfl.config.NumericsConfig`) and, when a thread count is given, torch's and the BLAS
    libraries' thread pools (threadpoolctl), so that a fixed summation order does not depend
    on how many cores the machine has.

    >>> import torch
    >>> p = setup("smoke")
    >>> torch.get_default_dtype(), torch.get_num_threads(), p.name
    (torch.float64, 1, 'smoke')
    >>> _ = setup("paper"); torch.get_default_dtype()
    torch.float32
    """
    if not isinstance(profile, Profile):
        profile = active(profile)
    num = profile.numerics
    if num.dtype not in DTYPES:
        raise ValueError(f"NumericsConfig.dtype must be one of {sorted(DTYPES)}, got {num.dtype!r}")
    torch.set_default_dtype(DTYPES[num.dtype])
    n = threads if threads is not None else num.threads
    if n is not None:
        torch.set_num_threads(n)
        threadpool_limits(limits=n)
    return profile
