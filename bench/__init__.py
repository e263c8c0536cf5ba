"""Benchmarks: does wall-clock follow the FLOPs an AdaLLaVA plan predicts? Run ``python -m bench``."""
