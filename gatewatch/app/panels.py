"""What quantities add to other quantities' dashboard pages (``ReadHalf.panels``): functions ``draw(ctx, run)``
called at the end of a page by :func:`gatewatch.app.ui.panels`."""

from __future__ import annotations

import streamlit as st

from .. import figures
from ..run_reader import Run
from . import ui


def similarity(ctx: ui.Context, run: Run) -> None:
    """The experts' similarity (the ``similarity`` quantity) on the Experts page: CKA matrix and trend per pool."""
    table = run.table("similarity")
    if not len(table):
        return
    st.markdown("#### Do the experts learn different things?")
    st.caption("Linear CKA of each pair of experts' outputs on the same rows of a batch (fused experts of a sparse "
               "MoE: each probe row sent to every expert): 1 = the same representation up to a rotation. Unrelated "
               "experts of this size sit around 0.1-0.3, not 0.")
    pools = sorted(table["pool"].dropna().astype(str).unique())
    pool = st.selectbox("experts of", pools, key="similarity_pool") if len(pools) > 1 else pools[0]
    redundant = ctx.thresholds.redundant_cka
    left, right = st.columns(2)
    with left:
        ui.chart(figures.similarity_matrix(table, pool, threshold=redundant), key="similarity_matrix")
    with right:
        ui.chart(figures.similarity_over_time(table, pool, threshold=redundant,
                                              summary=run.table("similarity_summary")), key="similarity_trend")
