"""genattr.bench."""
