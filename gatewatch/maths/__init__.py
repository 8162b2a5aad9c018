"""Gate maths: the device sums a window keeps (:mod:`.gate_sums`, torch) and the published metrics made of them
(:mod:`.gate_metrics`, numpy only). Each formula has a plain-numpy twin in the tests."""
