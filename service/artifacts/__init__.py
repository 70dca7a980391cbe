"""Uploaded artifacts (exported models, data samples): use cases (`service`) and HTTP routes (`routes`)."""
