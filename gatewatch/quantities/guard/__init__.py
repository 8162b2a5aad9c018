"""The online guard: gate dropout when polarization or collapse is found at a flush."""
