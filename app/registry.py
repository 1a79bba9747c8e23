"""The model registry: which trained models exist, and a bounded cache of loaded ones.

A model is the folder `models/{model_id}/` of the model storage (`IWAE_STORAGE_URL`: by
default `IWAE_HOME/models/{model_id}/`); it is listed and served only once the worker has
written its `model.json` (the job succeeded). Descriptions are re-read only when the stored
object changed; checkpoints load lazily, on first use, from a local copy (an object store's
download is cached on this host until the object changes), and the `cache_size` most
recently used stay in memory (LRU). Safe to call from many request threads at once: the
cache is guarded by a lock, each model loads once even when many requests ask for it
together, and loaded models are in eval mode, read-only.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from app.errors import ModelNotFound, ModelUnavailable, NoModelTrained
from app.schemas import ID_PATTERN
from models.checkpoint import load_model
from models.config import TrainConfig
from models.networks import IWAEModel
from models.storage import ObjectInfo, Storage
from models.storage.layout import CHECKPOINT_NAME, MODEL_INFO_NAME, MODELS, listed_model, model_key

_ID = re.compile(ID_PATTERN)


@dataclass(frozen=True)
class ServedModel:
    """A loaded model, ready for inference."""

    model_id: str
    model: IWAEModel
    config: TrainConfig

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


class ModelRegistry:
    def __init__(self, storage: Storage, cache_size: int = 4, device: str = "cpu") -> None:
        self.storage = storage
        self.cache_size = cache_size
        self.device = device
        self._cache: OrderedDict[str, tuple[str, ServedModel]] = OrderedDict()
        self._descriptions: dict[str, tuple[str, dict[str, Any] | None]] = {}
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    def list(self) -> list[dict[str, Any]]:
        """Every trained model's `model.json`, newest first."""
        found = []
        for info in self.storage.list(f"{MODELS}/"):
            model_id = listed_model(info.key)
            description = None if model_id is None else self._read(model_id, info)
            if description is not None:
                found.append(description)
        return sorted(found, key=_order_key, reverse=True)

    def page(
        self, *, limit: int, cursor: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Up to `limit` models, newest first, after `cursor` (the previous page's
        `next_cursor`); returns them and the next page's cursor (None on the last page).
        """
        models = [m for m in self.list() if cursor is None or _order_key(m) < cursor]
        if len(models) <= limit:
            return models, None
        return models[:limit], _order_key(models[limit - 1])

    def describe(self, model_id: str) -> dict[str, Any]:
        """One model's `model.json`; `ModelNotFound` when it does not exist (yet)."""
        key = model_key(self._checked(model_id), MODEL_INFO_NAME)
        info = self.storage.stat(key)
        description = None if info is None else self._read(model_id, info)
        if description is None:
            raise ModelNotFound(f"no trained model with id {model_id!r}")
        return description

    def checkpoint(self, model_id: str) -> Path | None:
        """The checkpoint of a listed model, as a local file; None when the model is not
        listed."""
        try:
            self.describe(model_id)
        except ModelNotFound:
            return None
        return self.storage.fetch(model_key(model_id, CHECKPOINT_NAME))

    def resolve(self, model_id: str | None) -> str:
        """`model_id` itself, or the newest model's when None; errors when there is none."""
        if model_id is not None:
            self.describe(model_id)
            return model_id
        models = self.list()
        if not models:
            raise NoModelTrained(
                "no model has been trained yet: start one with "
                'POST /train {"k": 5, "epochs": 5}, watch it with GET /jobs/{job_id}, '
                "and ask again once it has succeeded"
            )
        return str(models[0]["model_id"])

    def load(self, model_id: str | None = None) -> ServedModel:
        """The model `model_id` (default: the newest), from the cache or its checkpoint."""
        model_id = self.resolve(model_id)
        key = model_key(model_id, CHECKPOINT_NAME)
        info = self.storage.stat(key)
        if info is None:
            raise ModelUnavailable(f"model {model_id!r} has no checkpoint file")
        stamp = info.stamp
        with self._lock:
            served = self._cached(model_id, stamp)
            if served is not None:
                return served
            loading = self._loading.setdefault(model_id, threading.Lock())
        with loading:  # one thread loads; the others wait for it, then hit the cache
            with self._lock:
                served = self._cached(model_id, stamp)
            if served is not None:
                return served
            try:
                path = self.storage.fetch(key)
                if path is None:
                    raise FileNotFoundError(key)
                model, config = load_model(path, device=self.device)
            except Exception as exc:  # a torn file, or a store that cannot be reached
                # The cause names files on the server: logged by the handler, never sent.
                raise ModelUnavailable(f"model {model_id!r} cannot be loaded") from exc
            served = ServedModel(model_id=model_id, model=model.eval(), config=config)
            with self._lock:
                self._cache[model_id] = (stamp, served)
                self._cache.move_to_end(model_id)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            return served

    def cached_ids(self) -> list[str]:
        """Ids in the cache, least recently used first."""
        with self._lock:
            return list(self._cache)

    def _cached(self, model_id: str, stamp: str) -> ServedModel | None:
        """Cache hit when the checkpoint file has not changed since it was loaded."""
        hit = self._cache.get(model_id)
        if hit is None or hit[0] != stamp:
            return None
        self._cache.move_to_end(model_id)
        return hit[1]

    @staticmethod
    def _checked(model_id: str) -> str:
        if not _ID.match(model_id):
            raise ModelNotFound(f"no trained model with id {model_id!r}")
        return model_id

    def _read(self, model_id: str, info: ObjectInfo) -> dict[str, Any] | None:
        """The `model.json` `info` describes, read again only when it changed."""
        with self._lock:
            seen = self._descriptions.get(model_id)
        if seen is not None and seen[0] == info.stamp:
            return seen[1]
        description = _parse(self.storage.get(info.key), model_id)
        with self._lock:
            self._descriptions[model_id] = (info.stamp, description)
        return description


def _parse(data: bytes | None, model_id: str) -> dict[str, Any] | None:
    """A `model.json`, or None when it is absent or not whole (not listed until it is)."""
    try:
        description = json.loads(data) if data is not None else None
    except ValueError:
        return None
    if not isinstance(description, dict):
        return None
    description.setdefault("model_id", model_id)
    return description


def _order_key(description: dict[str, Any]) -> str:
    """Newest-first order of models, and the cursor of their pages: creation time, then id."""
    return f"{description.get('created_at') or ''}_{description.get('model_id') or ''}"
