"""Recommendations: the use cases (`service`) and their HTTP routes (`routes`)."""
