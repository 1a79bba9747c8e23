"""Inference with a trained model: samples, reconstructions, log-likelihoods, imputations.

Every route here awaits the inference gate (`app.backpressure`) first, which runs the model
in threads of its own, a few at a time, so inference never blocks the event loop and never
delays the ops routes. They are listed under the `models` tag, beside the models they use.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Query, Response

from app import inference
from app.deps import InferenceDep, SettingsDep, served_model
from app.images import MaskedDigit, encode_imputation_strip, encode_png, encode_png_grid
from app.params import Seed, impute_k, loglik_k, sample_count
from app.registry import ServedModel
from app.schemas import ImageFormat, ImputationOut, LoglikOut, ReconstructionOut, SamplesOut
from app.schemas import error_responses as _errors
from app.uploads import uploaded_digit, uploaded_masked_digit

router = APIRouter(tags=["models"])

Model = Annotated[ServedModel, Depends(served_model)]
Digit = Annotated[np.ndarray, Depends(uploaded_digit)]
Masked = Annotated[MaskedDigit, Depends(uploaded_masked_digit)]
Format = Annotated[ImageFormat, Query(description="`png` (an image) or `json` (the pixel values).")]

_MODEL_ERRORS = _errors(404, 409, 503)  # 503: the inference gate is full or timed out
_UPLOAD_ERRORS = _errors(400, 404, 409, 413, 415, 503)
_PNG = {200: {"content": {"image/png": {}}, "description": "PNG by default, JSON on request."}}


@router.get("/samples", response_model=SamplesOut, responses={**_PNG, **_MODEL_ERRORS})
async def samples(
    call: InferenceDep,
    model: Model,
    n: Annotated[int, Depends(sample_count)],
    seed: Seed = None,
    format: Format = "png",
) -> Any:
    """Digits drawn from the model: a PNG grid, or JSON with 784 Bernoulli means each."""
    return await call(_samples_answer, model, n, seed, format)


def _samples_answer(model: ServedModel, n: int, seed: int | None, format: str) -> Response:
    """Drawn and encoded in the inference thread: encoding 1024 digits takes about 0.5 s,
    which on the event loop would stall every other request."""
    images = inference.sample(model, n, seed)  # [n, 784]
    if format == "png":
        return Response(encode_png_grid(images), media_type="image/png")
    body = SamplesOut(model_id=model.model_id, samples=np.round(images, 4).tolist())
    return Response(body.model_dump_json(), media_type="application/json")


@router.post(
    "/reconstruct",
    response_model=ReconstructionOut,
    responses={**_PNG, **_UPLOAD_ERRORS},
)
async def reconstruct(
    call: InferenceDep, digit: Digit, model: Model, format: Format = "png"
) -> Any:
    """The uploaded digit passed through the encoder's mean and the decoder."""
    image = await call(inference.reconstruct, model, digit)  # [784]
    if format == "png":
        return Response(encode_png(image), media_type="image/png")
    return ReconstructionOut(
        model_id=model.model_id, input=digit.tolist(), reconstruction=np.round(image, 4).tolist()
    )


@router.post("/loglik", responses=_UPLOAD_ERRORS)
async def loglik(
    call: InferenceDep,
    digit: Digit,
    model: Model,
    k: Annotated[int, Depends(loglik_k)],
    settings: SettingsDep,
    seed: Seed = None,
) -> LoglikOut:
    """log p(x) of the uploaded digit, estimated with K importance samples, in nats.

    Stops between chunks of samples at IWAE_INFERENCE_TIMEOUT_S or when the client leaves.
    """
    chunk_size = settings.loglik_chunk_size
    score = await call(
        inference.score, model, digit, k, chunk_size=chunk_size, seed=seed, on_chunk=call.check
    )
    fields = asdict(score)  # the estimates; bits_per_dim is a property, so named here
    return LoglikOut(model_id=model.model_id, k=k, bits_per_dim=score.bits_per_dim, **fields)


@router.post(
    "/impute",
    response_model=ImputationOut,
    responses={**_PNG, **_UPLOAD_ERRORS},
)
async def impute(
    call: InferenceDep,
    masked: Masked,
    model: Model,
    k: Annotated[int, Depends(impute_k)],
    n: Annotated[int, Query(ge=0, le=64, description="Multiple imputations to draw.")] = 8,
    seed: Seed = None,
    format: Format = "png",
) -> Any:
    """Fill in the missing pixels: a PNG strip (input, mask, single imputation, n draws), or
    JSON. Any trained model works; one trained with `missing_rate` > 0 should do better."""
    return await call(_impute_answer, model, masked, k, n, seed, format)


def _impute_answer(
    model: ServedModel, masked: MaskedDigit, k: int, n: int, seed: int | None, format: str
) -> Response:
    """Imputed and encoded in the inference thread, like `_samples_answer`."""
    result = inference.impute(model, masked.digit, masked.missing, k, n, seed)
    if format == "png":
        return Response(
            encode_imputation_strip(masked, result.single, result.draws), media_type="image/png"
        )
    body = ImputationOut(
        model_id=model.model_id,
        k=k,
        input=masked.digit.tolist(),
        missing=masked.missing.astype(int).tolist(),
        single=np.round(result.single, 4).tolist(),
        draws=result.draws.tolist(),
        observed_log_likelihood=result.observed_log_likelihood,
    )
    return Response(body.model_dump_json(), media_type="application/json")
