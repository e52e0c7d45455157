"""The frozen CLIP: backbone and preprocessing, pretraining of the offline tiny tower, and
training-free zero-shot maps."""
