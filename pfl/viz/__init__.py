"""Figures and interaction: plotting functions (re-exported here), the explorer widget, figure
regeneration and the ablation sweeps behind notebook 08.

Only :mod:`pfl.viz.plots` is imported here; it imports nothing from pfl above the data layer,
so the run layer can draw its qualitative figures without importing the explorer or sweeps.
"""

from pfl.viz.plots import *  # noqa: F403
from pfl.viz.plots import __all__  # noqa: F401
