"""Prometheus metrics, public surface. Needs the ``metrics`` extra (``prometheus-client``).

Kept out of the package root so ``import metered_middleware`` never requires prometheus-client.
"""

from metered_middleware._metrics import MeasuredSink, MeteringMetrics, metrics_app, run_with_metrics

__all__ = ["MeasuredSink", "MeteringMetrics", "metrics_app", "run_with_metrics"]
