"""tip_ray: token-selective on-policy distillation on Ray.

Importing the package imports no torch, Ray or vLLM; the subpackages do.
"""

__version__ = "0.1.0"
