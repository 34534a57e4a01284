"""Named choices that configs accept, kept free of heavy imports so that parsing a command line stays fast."""

from __future__ import annotations

from typing import Literal, get_args

Metric = Literal["macro_f1", "balanced_accuracy", "accuracy", "auroc_macro"]  # what selects and gates models
Precision = Literal["auto", "fp32", "bf16"]  # see cnn.precision for the policy behind each
PRECISIONS: tuple[str, ...] = get_args(Precision)
Backend = Literal["auto", "torch", "onnxruntime", "openvino"]  # see cnn.backends for the policy behind auto
BACKENDS: tuple[str, ...] = get_args(Backend)
