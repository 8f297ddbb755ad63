"""Evaluation: answer quality against the world's ground truth (quality.py) and how well a token adapter maps draft
tokens to target tokens (adapter.py)."""
