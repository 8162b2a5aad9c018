"""Ablations: expert knock-outs, gate-dropout sweeps and training comparisons of the chosen run, drawn by
``gatewatch.app.ablations.render`` (see the page convention in ``gatewatch/app/main.py``)."""

from gatewatch.app import ui
from gatewatch.app.ablations import render

ctx, ref, run, tok = ui.current_run()

render(ref.path, root=ctx.root, selected=[ref.path] + [r.path for r in ctx.selected if r.id != ref.id])
