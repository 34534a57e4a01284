"""What a reviewer sees: the labeling config made from the classes, and a task that carries the model's reading of
the image but never a path, a file name or a raw identifier."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pandas as pd

from cnn.io.pseudonyms import pseudonym
from cnn.review.tasks import NONE_OF_THESE, UNUSABLE, Neighbour, TaskImages, label_config, prediction, task_data

ROW = pd.Series(
    {
        "image_id": "a" * 64,
        "path": "/data/site-7/patient-4411/IMG_0001.dcm",
        "label": "nodule",
        "confidence": 0.55,
        "decision": "nodule",
        "top_k": '[["nodule", 0.55], ["normal", 0.40], ["effusion", 0.05]]',
        "review_reason": "low confidence 0.55 < 0.6 <script>alert(1)</script>",
        "urgency": 0.55,
        "model_name": "xray",
        "model_version": "3",
        "neighbour_label": "normal",
        "neighbour_agreement": 0.6,
        "duplicate_kind": None,
        "claim_no": "C-2026-004411",
        "patient": pseudonym("4411", b"k" * 32),
    }
)


def test_the_config_offers_every_class_and_the_two_reserved_answers_with_keys() -> None:
    classes = ["normal", "nodule", "effusion (left)", "a+b"]
    root = ET.fromstring(label_config(classes))
    choices = root.find(".//Choices")
    assert choices is not None and choices.get("name") == "label" and choices.get("toName") == "image"
    values = [c.get("value") for c in choices.findall("Choice")]
    assert values == [*classes, NONE_OF_THESE, UNUSABLE]
    keys = [c.get("hotkey") for c in choices.findall("Choice")]
    assert len(set(keys)) == len(keys)
    names = {tag.get("name") for tag in root.iter("Image")}
    assert names == {"image", "overlay", "similar"}


def test_a_task_carries_the_reading_and_pseudonyms_but_no_path_or_raw_identifier() -> None:
    images = TaskImages("/data/local-files/?d=i.png", "/data/local-files/?d=o.jpg", "/data/local-files/?d=s.png")
    data = task_data(ROW, images, [Neighbour("b" * 64, "normal", 0.93)], [])
    text = repr(data)
    assert data["image_id"] == ROW["image_id"] and data["model_version"] == "3" and data["urgency"] == 0.55
    assert data["patient"] == ROW["patient"]  # a pseudonym travels
    assert "patient-4411" not in text and "IMG_0001" not in text and "C-2026-004411" not in text
    assert "<script>" not in data["details"] and "&lt;script&gt;" in data["details"]
    assert "nodule 0.550, normal 0.400, effusion 0.050" in data["details"]
    assert "normal (0.93" in data["details"]  # the nearest training case and its label


def test_the_pre_annotation_is_the_decision_tagged_with_model_and_version() -> None:
    made = prediction(ROW)
    assert made["model_version"] == "xray v3" and made["score"] == 0.55
    assert made["result"][0]["value"] == {"choices": ["nodule"]}
    assert made["result"][0]["from_name"] == "label" and made["result"][0]["to_name"] == "image"
