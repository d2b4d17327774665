"""AI-GenBench: chronological windows of generators, the real Arrow format, the fixed augmentations."""
