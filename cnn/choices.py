"""Every name the pipeline accepts or writes as a choice, defined once: config choices, splits and their aliases,
resize modes, the registry's aliases. Free of heavy imports, so that parsing a command line stays fast."""

from __future__ import annotations

import re
from typing import Literal, get_args

Metric = Literal["macro_f1", "balanced_accuracy", "accuracy", "auroc_macro"]  # what selects and gates models
Precision = Literal["auto", "fp32", "bf16"]  # see cnn.model.precision for the policy behind each
PRECISIONS: tuple[str, ...] = get_args(Precision)
Backend = Literal["auto", "torch", "onnxruntime", "openvino"]  # see cnn.infer.backends for the policy behind auto
BACKENDS: tuple[str, ...] = get_args(Backend)
Resize = Literal["pad", "crop"]  # pad letterboxes (keeps the whole image), crop fills the square from the centre
RESIZE_MODES: tuple[str, ...] = get_args(Resize)
Explain = Literal["none", "review", "all"]  # which scored rows get a Grad-CAM overlay
Optimizer = Literal["adamw", "sgd"]
Schedule = Literal["cosine", "onecycle", "constant"]
Imbalance = Literal["none", "class_weights", "sampler"]
DemoKind = Literal["xray", "claims", "garments"]

# a dataset's (and a model's) name: a folder under CNN_HOME
DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# a class name: it becomes a column (prob_<class>) and a part of file names (overlays), so never a path
CLASS_NAME = re.compile(r"^[^\W_][\w .+()-]{0,63}$")
CLASS_NAME_RULE = "letters, digits, spaces and _ . + - ( ) (at most 64), starting with a letter or digit"

SPLITS = ("train", "val", "test")  # the one list of splits, in this order everywhere
# how a split folder or a manifest's split column may name each split
SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}

# what a partitioned prediction table may be partitioned by (date: the UTC day scored)
PARTITION_COLUMNS = ("date", "label", "decision", "model_name", "model_version")
# the Delta tables under a scoring output's folder or prefix, and the views of its predictions (cnn/batch/delta_sink.py)
DELTA_TABLES = ("predictions", "rejects", "reviews", "drift")
DELTA_VIEWS = ("review", "duplicates", "embeddings")
DELTA_EXPORTS = (*DELTA_TABLES, *DELTA_VIEWS)  # what `cnn tables export --table` writes

# the registry's aliases: the version scoring uses, a gated version that did not win, the champion it replaced
CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous"
