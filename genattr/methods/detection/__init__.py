"""Real/fake detectors trained over chronological windows (AI-GenBench)."""
