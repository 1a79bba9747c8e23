"""The model registry: which trained models exist, and a bounded cache of loaded ones.

A model is the directory `IWAE_HOME/models/{model_id}/`; it is listed and served only once
the worker has written its `model.json` (the job succeeded). Checkpoints load lazily, on
first use, and the `cache_size` most recently used stay in memory (LRU). Each `model.json`
is read once and kept while its file is unchanged, so listing (every `/models` page, every
request for the default model) costs a stat per model, not a read and a parse. Safe to call from
many request threads at once: the cache is guarded by a lock, each model loads once even
when many requests ask for it together, and loaded models are in eval mode, read-only.
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

CHECKPOINT = "model.safetensors"
DESCRIPTION = "model.json"
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
    def __init__(self, models_dir: Path, cache_size: int = 4, device: str = "cpu") -> None:
        self.models_dir = Path(models_dir)
        self.cache_size = cache_size
        self.device = device
        self._cache: OrderedDict[str, tuple[int, ServedModel]] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        self._descriptions: dict[Path, tuple[tuple[int, int], dict[str, Any]]] = {}

    def list(self) -> list[dict[str, Any]]:
        """Every trained model's `model.json`, newest first."""
        found = []
        seen: dict[Path, tuple[tuple[int, int], dict[str, Any]]] = {}
        for path in self.models_dir.glob(f"*/{DESCRIPTION}"):
            try:
                stat = path.stat()
            except FileNotFoundError:  # unlisted meanwhile
                continue
            stamp = (stat.st_mtime_ns, stat.st_size)
            with self._lock:
                known = self._descriptions.get(path)
            description = known[1] if known is not None and known[0] == stamp else self._read(path)
            if description is not None:
                seen[path] = (stamp, description)
                found.append(dict(description))  # a copy: callers may change theirs
        with self._lock:
            self._descriptions = seen  # the models gone since are forgotten
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
        description = self._read(self._directory(model_id) / DESCRIPTION)
        if description is None:
            raise ModelNotFound(f"no trained model with id {model_id!r}")
        return description

    def checkpoint(self, model_id: str) -> Path | None:
        """The checkpoint of a listed model; None when the model is not listed."""
        try:
            self.describe(model_id)
        except ModelNotFound:
            return None
        path = self._directory(model_id) / CHECKPOINT
        return path if path.is_file() else None

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
        path = self._directory(model_id) / CHECKPOINT
        try:
            stamp = path.stat().st_mtime_ns
        except FileNotFoundError as exc:
            raise ModelUnavailable(f"model {model_id!r} has no checkpoint file") from exc
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
                model, config = load_model(path, device=self.device)
            except (OSError, ValueError, KeyError, RuntimeError) as exc:
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

    def _cached(self, model_id: str, stamp: int) -> ServedModel | None:
        """Cache hit when the checkpoint file has not changed since it was loaded."""
        hit = self._cache.get(model_id)
        if hit is None or hit[0] != stamp:
            return None
        self._cache.move_to_end(model_id)
        return hit[1]

    def _directory(self, model_id: str) -> Path:
        if not _ID.match(model_id):
            raise ModelNotFound(f"no trained model with id {model_id!r}")
        return self.models_dir / model_id

    @staticmethod
    def _read(path: Path) -> dict[str, Any] | None:
        try:
            description = json.loads(path.read_text())
        except (OSError, ValueError):
            return None  # absent, or being written: not listed until it is whole
        if not isinstance(description, dict):
            return None
        description.setdefault("model_id", path.parent.name)
        return description


def _order_key(description: dict[str, Any]) -> str:
    """Newest-first order of models, and the cursor of their pages: creation time, then id."""
    return f"{description.get('created_at') or ''}_{description.get('model_id') or ''}"
