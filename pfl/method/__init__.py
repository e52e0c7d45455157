"""Bayes-PFL itself: planar prompt flows, prompt banks, RCA, the noise policy (sampling), losses
and the model, plus the :mod:`~pfl.method.contract` that every method (Bayes-PFL and the peers)
meets."""
