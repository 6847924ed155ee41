"""OGLS-SD: on-policy self-distillation with outcome-guided logit steering."""

__version__ = "0.1.0"

# Every algorithm module registers itself (ogls_sd.registry) when the package is first imported, so
# a config is validated against the full table whichever module a caller imports first.
from . import algorithms  # noqa: E402,F401
