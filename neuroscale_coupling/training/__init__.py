"""Offline: training (``neuroscale train``, :mod:`~neuroscale_coupling.training.train`, its
TOML configuration in :mod:`~neuroscale_coupling.training.config`) and evaluation on
held-out microstructures (``neuroscale evaluate``,
:mod:`~neuroscale_coupling.training.evaluate`, :mod:`~neuroscale_coupling.training.
held_out`, :mod:`~neuroscale_coupling.training.metric_spread`). The loss is the model's
own (:mod:`~neuroscale_coupling.surrogate.loss`), shared with online enrichment.
"""
