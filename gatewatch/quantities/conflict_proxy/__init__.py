"""Conflict proxy: task gradients at each task's mixed representation, combined with the gate weights."""
