"""Celery workers that train models for the API, and the job store they report to.

Imports `models`, never `app`. Importing this package does no I/O and does not import torch.
"""
