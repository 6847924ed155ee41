"""OGLS-SD: on-policy self-distillation with outcome-guided logit steering."""

__version__ = "0.1.0"
