"""Pure maths: MI estimators, span scores and costs, block selection, the speed model.

No file I/O and no vLLM here; every function takes arrays or numbers and returns them.
"""
