"""supersub: the Super-Sub framework (Wen et al., 2022) for hierarchical image classification.

This package is the core: hierarchies, data sources, models, sparse quantised deltas, the training
loop, the two-stage predictor, metrics and bundles. It imports neither Ray nor MLflow, so the same
code runs in a Ray Train worker, in a Serve replica and in a plain script on a GPU machine.
"""

__version__ = "0.1.0"
