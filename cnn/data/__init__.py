"""Datasets on disk: ingest (scan, decode, split, commit), the image cache, splits, the dataset report,
augmentation, training loaders, demo data.
"""
