"""fedward client package."""

from common.monai_without_mlflow import install as _import_monai_without_mlflow

_import_monai_without_mlflow()
