"""cnn: the image-classification library (data, decoding, augmentation, models, training, scoring).

It never imports prefect or mlflow, so it can be used on its own.
"""

__version__ = "0.1.0"
