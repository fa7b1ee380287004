"""Offline calibration: score caches (and heal maps) made ahead of serving, one recipe per model.

``python -m calibration.run calibration/recipes/*.json`` runs each recipe through the same
functions ``vllm serve --load-format miprun`` plans with, so a server started later with the
recipe's options finds every cache it needs and starts without calibrating.
"""
