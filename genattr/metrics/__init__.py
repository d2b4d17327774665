"""genattr.metrics."""
