"""Data attribution for text-to-image diffusion models: AbU (attribution by unlearning), baselines, leave-K-out."""
