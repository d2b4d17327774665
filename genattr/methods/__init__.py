"""genattr.methods."""
