"""Experiments over runs: the selection-rule sweep (sweep), its report with tables, claims and
figures (report), and the rock-token list builder (rocks).
"""
