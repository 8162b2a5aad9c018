"""See :mod:`gatewatch.quantities`: ``capture`` (torch) and ``read`` (pandas) halves."""
