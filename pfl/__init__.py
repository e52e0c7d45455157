"""pfl: Bayesian Prompt Flow Learning (Bayes-PFL) for zero-shot anomaly detection, reproduced.

The public API is small: :func:`setup` (call it first: it applies the profile's numerical
settings and returns the profile) and the subpackages, one job each:

- :mod:`pfl.config` typed configs and the ``smoke`` / ``paper`` profiles;
- :mod:`pfl.data` the synthetic benchmark, ``meta.json`` datasets and adapters;
- :mod:`pfl.clip` the frozen CLIP, the tiny tower's pretraining, zero-shot maps;
- :mod:`pfl.method` Bayes-PFL (flows, prompts, losses, model) and the method contract;
- :mod:`pfl.baselines` the peer methods; :mod:`pfl.run` training, evaluation, prediction;
- :mod:`pfl.viz` figures and the explorer; :mod:`pfl.cli` the command line.

Typical start of a notebook or script::

    import pfl
    profile = pfl.setup()  # $PFL_PROFILE or "smoke"; float64 and one thread in smoke
"""

__version__ = "0.1.0"


def setup(*args, **kwargs):
    """:func:`pfl.runtime.setup` (imported on call, so that ``import pfl`` stays light: the
    command line checks its inputs before torch loads)."""
    from pfl.runtime import setup as _setup

    return _setup(*args, **kwargs)


__all__ = ["setup", "__version__"]
