"""The data's path: calibration text -> calibration pass -> score cache -> plan (and its
forward-pass refinement; in a child process when it would initialise CUDA). No vLLM here."""
