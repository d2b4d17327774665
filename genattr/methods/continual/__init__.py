"""genattr.methods.continual."""
