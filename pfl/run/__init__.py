"""Running methods: the feature cache, training, checkpoints and run folders, evaluation,
prediction, metrics and result tables, and the demo."""
