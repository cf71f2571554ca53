"""The recommendation gateway: recommendations, events, similar items, health and metrics."""
