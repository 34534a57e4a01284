"""What reviewers see in Label Studio: the labeling config made from a model's classes, and one task per review row
(the image as the model saw it, the Grad-CAM overlay, the nearest training cases, the model's reading of it) with
the model's decision as a pre-annotation."""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from cnn.io.pseudonyms import PREFIX
from cnn.metrics.operating_points import OperatingPoint

CHOICES = "label"  # the Choices tag reviewers answer in (from_name)
IMAGE = "image"  # the Image tag the answer is about (to_name)
UNUSABLE = "(unusable image)"  # a reviewer's "this image cannot be read": never a training label
NONE_OF_THESE = "(none of these classes)"  # "not any class the model knows": never a training label
VERDICTS = {UNUSABLE: "unusable", NONE_OF_THESE: "none_of_these"}  # reserved choices (class names never start "(")
PROJECT_PREFIX = "cnn review: "
_PSEUDONYM = re.compile(rf"^{re.escape(PREFIX)}[0-9a-f]{{32}}$")
_HOTKEYS = "1234567890qwertyuiop"


def project_title(model_name: str) -> str:
    """The Label Studio project of a registered model (one per model, across its versions)."""
    return f"{PROJECT_PREFIX}{model_name}"


def label_config(classes: Sequence[str]) -> str:
    """The labeling interface: the image and its overlay side by side, one single choice among the classes and
    the two reserved answers (number keys), then the model's reading and the nearest training cases."""
    choices = [*classes, NONE_OF_THESE, UNUSABLE]
    lines = []
    for i, value in enumerate(choices):
        key = f' hotkey="{_HOTKEYS[i]}"' if i < len(_HOTKEYS) else ""
        lines.append(f'    <Choice value="{html.escape(value, quote=True)}"{key}/>')
    return "\n".join(
        [
            "<View>",
            '  <Header value="$title"/>',
            '  <View style="display: flex; gap: 12px; flex-wrap: wrap">',
            '    <View style="flex: 1; min-width: 260px"><Header value="Image (as the model saw it)" size="6"/>',
            f'      <Image name="{IMAGE}" value="$image" zoom="true" zoomControl="true" maxHeight="360px"/></View>',
            '    <View style="flex: 1; min-width: 260px"><Header value="Grad-CAM of the predicted class" size="6"/>',
            '      <Image name="overlay" value="$overlay" maxHeight="360px"/></View>',
            "  </View>",
            f'  <Choices name="{CHOICES}" toName="{IMAGE}" choice="single-radio" showInline="true" required="true">',
            *lines,
            "  </Choices>",
            '  <HyperText name="details" value="$details"/>',
            '  <Header value="Nearest training cases" size="6"/>',
            '  <Image name="similar" value="$similar" maxWidth="900px"/>',
            "</View>",
        ]
    )


@dataclass(frozen=True)
class Neighbour:
    """A nearest training case: its image id, its label and the cosine similarity of the embeddings."""

    image_id: str
    label: str
    similarity: float


@dataclass(frozen=True)
class TaskImages:
    """Where the three pictures of a task are, as Label Studio's URLs."""

    image: str
    overlay: str
    similar: str


def task_data(
    row: pd.Series, images: TaskImages, neighbours: Sequence[Neighbour], points: Sequence[OperatingPoint]
) -> dict[str, Any]:
    """The task's data: the pictures, the HTML reviewers read, and the keys (image id, model, version, urgency).
    Only the image id and pseudonymised columns travel: never a path, a file name or a raw identifier."""
    data: dict[str, Any] = {
        "image_id": str(row["image_id"]),
        "model": str(row["model_name"]),
        "model_version": str(row["model_version"]),
        "title": f"{row['model_name']} v{row['model_version']}: {row.get('decision')} - review",
        IMAGE: images.image,
        "overlay": images.overlay,
        "similar": images.similar,
        "urgency": _number(row.get("urgency")),
        "confidence": _number(row.get("confidence")),
        "decision": _text(row.get("decision")),
        "details": details_html(row, neighbours, points),
    }
    for column, value in row.items():
        if isinstance(value, str) and _PSEUDONYM.match(value) and column not in data:
            data[str(column)] = value
    return data


def prediction(row: pd.Series) -> dict[str, Any]:
    """The model's decision as Label Studio's pre-annotation, tagged with the model's name and version."""
    return {
        "model_version": model_tag(row),
        "score": _number(row.get("confidence")),
        "result": [
            {
                "from_name": CHOICES,
                "to_name": IMAGE,
                "type": "choices",
                "value": {"choices": [str(row["decision"])]},
            }
        ],
    }


def model_tag(row: pd.Series) -> str:
    return version_tag(str(row["model_name"]), str(row["model_version"]))


def version_tag(name: str, version: str) -> str:
    """How a version names its predictions in Label Studio (and the project pre-fills from the newest)."""
    return f"{name} v{version}"


def details_html(row: pd.Series, neighbours: Sequence[Neighbour], points: Sequence[OperatingPoint]) -> str:
    """What the model read in the image, as a small HTML table (every value escaped)."""
    rows = [
        ("Decision", _decision(row, points)),
        ("Top classes (calibrated)", _top(row)),
        ("Why review", _text(row.get("review_reason")) or "-"),
        ("Urgency", _fmt(row.get("urgency"))),
        ("Nearest training cases", _neighbours(row, neighbours)),
        ("Reused photo", _reuse(row)),
        ("Image id", str(row["image_id"])),
    ]
    cells = "".join(
        f"<tr><th style='text-align:left;padding-right:12px'>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
        for k, v in rows
    )
    return f"<table>{cells}</table>"


def _decision(row: pd.Series, points: Sequence[OperatingPoint]) -> str:
    decision, label = _text(row.get("decision")), _text(row.get("label"))
    said = f"{decision} (most probable: {label}, {_fmt(row.get('confidence'))})"
    point = next((p for p in points if p.class_name == decision), None)
    if point is not None:
        said += f"; operating point {point.spec.describe()} -> threshold {point.threshold:.3f}"
    elif points and decision != label:
        said += "; decided by the operating points"
    return said


def _top(row: pd.Series) -> str:
    raw = row.get("top_k")
    if not isinstance(raw, str) or not raw:
        return f"{_text(row.get('label'))} {_fmt(row.get('confidence'))}"
    return ", ".join(f"{name} {float(p):.3f}" for name, p in json.loads(raw))


def _neighbours(row: pd.Series, neighbours: Sequence[Neighbour]) -> str:
    listed = "; ".join(f"{n.label} ({n.similarity:.2f}, {n.image_id[:12]})" for n in neighbours)
    label, agreement = _text(row.get("neighbour_label")), row.get("neighbour_agreement")
    summary = f"mostly {label} ({_fmt(agreement)} agree)" if label else ""
    return " - ".join(s for s in (summary, listed) if s) or "-"


def _reuse(row: pd.Series) -> str:
    """What a reused photo copies: the kind of copy, where the earlier image was, its id and (training) label; the
    earlier image's carried id columns stay out."""
    kind, earlier = _text(row.get("duplicate_kind")), row.get("duplicate_of")
    if not kind:
        return "no"
    try:
        found = json.loads(earlier) if isinstance(earlier, str) else {}
    except json.JSONDecodeError:
        found = {}
    said = f"{kind} copy of {found.get('source', 'an earlier')} image {str(found.get('image_id', '?'))[:12]}"
    return said + (f", labelled {found['label']}" if found.get("label") else "")


def _number(value: object) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else round(number, 6)


def _text(value: object) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def _fmt(value: object) -> str:
    number = _number(value)
    return "-" if number is None else f"{number:.3f}"
