"""What quantities add to other quantities' dashboard pages (``ReadHalf.panels``): functions ``draw(ctx, run)``
called at the end of a page by :func:`gatewatch.app.ui.panels`."""

from __future__ import annotations

import streamlit as st

from .. import figures
from ..figures._style import ordered
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


def coactivation(ctx: ui.Context, run: Run) -> None:
    """Co-activation (the ``coactivation`` quantity) on the Routers page: P(j | i) of one layer, in a full window."""
    table = run.table("coactivation")
    if not len(table):
        return
    st.markdown("#### Which experts are chosen together?")
    st.caption("Of the tokens that chose expert i (row), the share that also chose expert j (column), over every "
               "pair of each token's top-k. The run keeps the whole matrix in the first window, every "
               "coactivation_full_every-th and the last; every window's strongest pairs are in coactivation_top.")
    layers = ordered(table["gate"])
    layer = st.selectbox("layer", layers, key="coactivation_layer", index=len(layers) - 1) \
        if len(layers) > 1 else layers[0]
    steps = sorted(table.loc[table["gate"] == layer, "step"].unique())
    step = st.select_slider("full window", steps, value=steps[-1], key="coactivation_step") \
        if len(steps) > 1 else steps[0]
    routers = run.table("routers")
    mine = routers[routers["gate"] == layer]
    experts, top_k = (int(mine["experts"].iloc[-1]), int(mine["top_k"].iloc[-1])) if len(mine) else (None, None)
    ui.chart(figures.coactivation_heatmap(table, layer, step, experts=experts, top_k=top_k),
             key="coactivation_map")


def routing_stability(ctx: ui.Context, run: Run) -> None:
    """Routing stability and saturation on the probe batch (the ``routing_stability`` quantity), on the Routers
    page."""
    table, saturation = run.table("routing_stability"), run.table("saturation")
    if not len(table):
        return
    st.markdown("#### Has the routing settled?")
    st.caption("Every saturation_every steps a fixed probe batch runs through the model in eval mode: the share of "
               "its tokens whose top-k set is unchanged since the previous probe, and (written at close) the share "
               "whose top-k set already equals the final model's.")
    left, right = st.columns(2)
    with left:
        ui.chart(figures.stability_heatmap(table), key="stability_map")
    with right:
        ui.chart(figures.saturation_curve(saturation), key="saturation_curve")
