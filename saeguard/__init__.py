"""saeguard: sparse autoencoders that make language models' failures visible.

Data flows one way: model -> activations -> SAE -> metrics/scores -> report.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
