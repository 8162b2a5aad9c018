"""Sparse MoE routers: dispatch load, MaxVio, boundary margin, dropped tokens and expert bias per layer."""
