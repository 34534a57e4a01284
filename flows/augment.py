"""Prefect flow `augment`: validate an augmentation policy on a dataset and render a preview grid."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from cnn.data.augment import load_policy, preview_dataset, resolve_policy
from cnn.data.dataset import Dataset
from flows import workspace
from flows.logfilter import quiet_user_errors

quiet_user_errors()


@task(name="render-preview", cache_policy=NO_CACHE)
def render_preview(dataset_dir: str, policy: str, out: str, rows: int, augmented: int, seed: int) -> str:
    """Validate the policy against the dataset's shape and write the preview grid."""
    channels = Dataset(dataset_dir).require().meta().channels
    path = preview_dataset(dataset_dir, load_policy(resolve_policy(policy, channels)), out, rows, augmented, seed)
    create_markdown_artifact(
        f"Augmentation preview of policy `{policy}` on `{Path(dataset_dir).name}`: `{path}`",
        key="augment-preview",
        description="Augmentation preview",
    )
    return str(path)


@flow(name="augment")
def augment_flow(
    dataset: str, policy: str, preview: str, rows: int = 6, augmented: int = 5, seed: int = 0, home: str | None = None
) -> str:
    """Check POLICY on DATASET and save a grid of originals beside augmented samples to PREVIEW."""
    dataset_dir = workspace.configure(home).dataset(dataset).require().root
    return render_preview(str(dataset_dir), policy, str(Path(preview).resolve()), rows, augmented, seed)
