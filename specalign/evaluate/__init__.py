"""Evaluation: answer quality against the world's ground truth, acceptance metrics, timing reports."""
