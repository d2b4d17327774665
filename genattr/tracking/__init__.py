"""genattr.tracking."""
