"""What every quantity stands on: the gate specs (:mod:`.specs`, a leaf), gate discovery (:mod:`.discovery`),
the table of known sparse routers and the probe that recognises others (:mod:`.router_table`,
:mod:`.router_probe`), and the map from gate columns to expert modules (:mod:`.expert_map`)."""
