"""audit: find and fix wrong labels in image-classification validation sets.

The pipeline has one module per stage: :mod:`audit.datasets` (what images and
labels there are), :mod:`audit.zoo` (which models, with their weights and
preprocessing), :mod:`audit.scoring` (one decode pass feeding every model),
:mod:`audit.evaluate` (original / ReaL / sigmoid / clean / relabeled accuracy),
:mod:`audit.flag` (cleanlab label issues), :mod:`audit.store` (the DuckDB
workspace), :mod:`audit.export` (cleaned label sets) and :mod:`audit.cli`.
"""

from audit.errors import AuditError, UserError

__version__ = "0.1.0"
__all__ = ["AuditError", "UserError", "__version__"]
