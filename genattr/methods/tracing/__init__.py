"""Model tracing (``method=prada``): which RAR / VAR variant made an image, or none (specs/prada.md)."""
