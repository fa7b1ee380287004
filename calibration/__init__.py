"""Calibration and evaluation text: named corpora, their disjoint splits, token sampling."""
