"""Routing stability and saturation: how the routers' top-k choice of a fixed probe batch changes over training."""
