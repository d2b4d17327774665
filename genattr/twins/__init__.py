"""genattr.twins."""
