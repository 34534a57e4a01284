"""MLflow models-from-code entry point: a pyfunc that rebuilds the network from its contract and loads a
state_dict with weights_only=True. Input: a DataFrame with a `path` column (or `image` bytes). Output:
label, confidence, prob_<class> for each class, and error (None, or why a file could not be scored)."""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd


class CnnClassifier(mlflow.pyfunc.PythonModel):
    """Image classifier over files or bytes; preprocessing comes from the model's own contract."""

    def load_context(self, context: Any) -> None:
        from cnn.infer.predictor import Predictor

        self.predictor = Predictor.load(context.artifacts["weights"], context.artifacts["contract"], device="cpu")

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        if "image" in model_input.columns:
            paths = model_input["path"] if "path" in model_input.columns else [None] * len(model_input)
            sources = [
                bytes(b) if isinstance(b, (bytes, bytearray)) else str(p) for b, p in zip(model_input["image"], paths)
            ]
        elif "path" in model_input.columns:
            sources = [str(p) for p in model_input["path"]]
        else:
            raise ValueError("input needs a `path` column (image file paths) or an `image` column (bytes)")
        batch_size = int((params or {}).get("batch_size", 64))
        return self.predictor.predict_files(sources, batch_size=batch_size)


mlflow.models.set_model(CnnClassifier())
