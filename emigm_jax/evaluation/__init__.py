"""Evaluation: FID Inception-v3 (Flax), FID/sFID/IS/precision-recall, reference statistics,
the evaluate and sweep jobs, and the digits classifier score (one module each)."""
