"""Insight layer: what a trained model learned and how it compares: evaluation, calibration, the
HTML report, strategy comparison, model summaries and device benchmarks."""
