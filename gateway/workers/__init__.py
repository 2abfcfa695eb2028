"""Pools of GPU inference workers (upstream kind "workers"): membership, probing, load-aware
choice, backpressure before payment, outlier ejection. pool.py ties the parts together."""
