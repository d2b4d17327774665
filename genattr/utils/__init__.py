"""genattr.utils."""
