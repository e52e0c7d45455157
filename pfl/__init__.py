"""pfl: Bayesian Prompt Flow Learning (Bayes-PFL) for zero-shot anomaly detection, reproduced.

Modules, one job each: ``config`` (profiles), ``backbone`` (frozen CLIP), ``prompts``,
``flows``, ``model``, ``losses``, ``metrics``, ``data``, ``synthetic``, ``train``,
``evaluate``, ``viz``, ``baselines``; ``cli`` is the only command-line parser.
"""

__version__ = "0.1.0"
