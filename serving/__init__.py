"""Serving: the TF Serving-compatible model server and the recommendation gateway."""
