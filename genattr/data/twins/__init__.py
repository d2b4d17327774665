"""genattr.data.twins."""
