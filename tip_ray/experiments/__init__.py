"""Experiments over runs: the selection-rule sweep (sweep); its report (report: tables, page and
CLI) with the runs' numbers (scores), the papers' claims (claims), the figures (figures) and what
the runs were (provenance); and the rock-token list builder (rocks).
"""
