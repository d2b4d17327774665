"""Ablation reports from MLflow: ``python -m genattr.report <sweep dir | experiment name>``."""
