"""The study the service exists for: how K changes what IWAE learns.

A study trains a grid of cells (objective, K, seed; `grid`), each an ordinary training run
whose metrics hold the test log-likelihood, active units, training speed and gradient SNR
(`models.run`); `results` summarizes them over seeds, `report` draws the figures and
tables, `local` runs a grid on one machine.
"""
