"""Leaderboards, figures and the HTML report, rendered from records alone."""
