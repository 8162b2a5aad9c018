"""The seesaw: one task's validation metric improving while another's worsens, from the ``eval`` table."""
