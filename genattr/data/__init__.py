"""genattr.data."""
