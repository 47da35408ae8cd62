"""Training data: images, aspect buckets, slider pairs."""
