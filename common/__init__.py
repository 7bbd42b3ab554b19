"""fedward common package."""

from common.monai_unused_imports import install as _hide_unused_imports_from_monai

_hide_unused_imports_from_monai()
