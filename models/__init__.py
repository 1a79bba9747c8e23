"""Pure PyTorch library: data, networks, objectives, estimators, evaluation, gradient SNR,
training, checkpoints.

Tensors in, tensors out. Nothing here reads the environment, prints, or imports Celery,
FastAPI or Redis (see docs/CONTRACT.md).
"""
