"""OGLS-SD: on-policy self-distillation with outcome-guided logit steering.

The Python API (README, "Python API")::

    from ogls_sd import Config, train, evaluate

    cfg = Config()                      # or Config.load("configs/x.yaml", ["train.steps=20"])
    cfg.train.steps = 20                # every assignment is checked (ConfigError names the key)
    summary = train(cfg, data=rows, rewards=[my_reward, (other, 0.5)])
    result = evaluate(cfg, checkpoint=summary["checkpoint"])

``ogls_sd.evaluate`` is the API function (the accuracy code itself is :mod:`ogls_sd.accuracy`, model
loading for evaluation :mod:`ogls_sd.loading`).
"""

__version__ = "0.1.0"

# Every algorithm, rollout backend and task module registers itself (ogls_sd.registry) when the
# package is first imported, so a config is validated against the full tables whichever module a
# caller imports first.
from . import algorithms, rollout, tasks  # noqa: E402,F401
from .api import evaluate, train  # noqa: E402
from .config import Config, ConfigError  # noqa: E402

__all__ = ["Config", "ConfigError", "evaluate", "train"]
