"""genattr."""
