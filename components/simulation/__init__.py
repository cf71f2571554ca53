"""Simulation against the truth a synthetic data set was drawn from (``recsys simulate``).

``truth`` reads what the generator sampled from and answers, for a user and items shown to
them, the expected reward and a draw of what the user does. ``policies`` holds the
recommenders compared (random, popularity, retrieval alone, the oracle); the served system is
the gateway, called by the entry point. ``loop`` replays sampled users against each policy
on the same seeds; ``report`` writes ``summary.json`` and ``report.html``.
"""
