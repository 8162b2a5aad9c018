"""Sample groups on a shared gate: per-group share and load, and the gate's specialisation I(G;E)/H(G)."""
