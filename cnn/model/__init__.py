"""Networks and how they train: the model registry, the data contract, devices and precision, the time budget, the
weight average, DDP, the training engine and its run folder.
"""
