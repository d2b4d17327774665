"""genattr.models."""
