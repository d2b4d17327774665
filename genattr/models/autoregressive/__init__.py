"""Class-conditional autoregressive image generators (VAR next-scale, RAR raster-order) for model tracing."""
