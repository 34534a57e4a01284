"""Predictions from a trained model: the Predictor (torch), the ONNX backends, the prediction columns."""
