"""The data's path: calibration text -> calibration pass -> score cache -> plan (and its
forward-pass refinement). No vLLM here."""
