"""genattr.engine."""
