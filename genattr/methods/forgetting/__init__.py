"""Continual forgetting: GS-LoRA / GS-LoRA++, the forgetting baselines and their shared task loop."""
