"""The one owner of the storage layout: the keys of models, their files and study reports.

A model is the folder `models/{model_id}/` of the store (`IWAE_HOME/models/...` with the
file backend): its checkpoint, its `metrics.json`, and its `model.json`, whose presence makes
it listed and served. A study's report is the folder `studies/{study_id}/{fingerprint}/`.
"""

from __future__ import annotations

CHECKPOINT_NAME = "model.safetensors"
METRICS_NAME = "metrics.json"
MODEL_INFO_NAME = "model.json"

MODELS = "models"
STUDIES = "studies"


def model_key(model_id: str, name: str) -> str:
    """The key of the file `name` of the model `model_id`."""
    return f"{MODELS}/{model_id}/{name}"


def listed_model(key: str) -> str | None:
    """The model id when `key` is a model's `model.json`, else None."""
    parts = key.split("/")
    if len(parts) == 3 and parts[0] == MODELS and parts[2] == MODEL_INFO_NAME:
        return parts[1]
    return None


def report_prefix(study_id: str, fingerprint: str | None = None) -> str:
    """The folder of a study's reports, or of its report for one fingerprint."""
    base = f"{STUDIES}/{study_id}/"
    return base if fingerprint is None else f"{base}{fingerprint}/"
