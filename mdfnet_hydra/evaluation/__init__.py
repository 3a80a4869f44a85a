"""Evaluation of finished runs: metrics with uncertainty, paired comparisons, tables and figures."""
