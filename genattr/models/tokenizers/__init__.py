"""Image tokenizers of the autoregressive generators that PRADA traces (RAR single-scale VQ, VAR multi-scale VQ)."""
