"""Datasets on disk: readers for the published layouts, the synthetic face generator, transforms, precompute."""
