"""Data: procedural patterns and painted defects, the offline synthetic benchmark, the
``meta.json`` dataset and the adapters from published dataset layouts to it."""
