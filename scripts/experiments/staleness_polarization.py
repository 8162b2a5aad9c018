"""Does asynchronous (stale-gradient) training polarize the gates, and does 10% gate dropout cure it? On
census-income, MMoE trained with ``TrainConfig(staleness=tau)`` (each step applies the gradient computed on
the parameters of tau steps earlier, one process, exact staleness; see gatewatch.training.staleness): the
share of runs in which gatewatch's own ``polarization`` finding fires at the end, test AUC, when the
finding first fired vs since when it held to the end, and diverged runs (NaN, a constant tower) apart.

    python scripts/experiments/staleness_polarization.py                  # default cells, 20 seeds, 1,000 steps
    python scripts/experiments/staleness_polarization.py --full           # 4 settings x tau 0/8/32 x remedies
    python scripts/experiments/staleness_polarization.py --seeds 1 --steps 200 --tag small   # quick check

Writes docs/experiments/staleness_polarization[_TAG].{csv,json,html,png} and ``_summary.csv``. Every finished
run is appended to ``staleness_polarization[_TAG].jsonl`` at once; ``--resume`` reuses the runs found there
(jobs run seed by seed, so a run cut short and resumed with fewer ``--seeds`` still has every cell).
"""

from __future__ import annotations

import json
import math
import time
from itertools import combinations
from typing import Any

import pandas as pd
import plotly.graph_objects as go
from common import fisher_exact, job, parser, run_all, save_figure, settings, wilson, write_results
from plotly.subplots import make_subplots

from gatewatch.training import TrainConfig

# name -> (MMoE experts, learning rate)
SETTINGS = {
    "8 experts, lr 1e-3": (8, 1e-3),
    "4 experts, lr 1e-3": (4, 1e-3),
    "8 experts, lr 1e-2": (8, 1e-2),
    "4 experts, lr 1e-2": (4, 1e-2),
}
TAUS = (0, 8, 32)
# name -> TrainConfig overrides: gate dropout from the start, or the online guard (gw.Guard) that applies it
# to a gate once gatewatch's polarization or collapse finding fires
REMEDIES: dict[str, dict[str, Any]] = {"none": {}, "gate dropout 10%": {"gate_dropout": 0.1},
                                       "guard 10%": {"guard_dropout": 0.1}}
# the cells of the default run, (setting, tau, remedy). The setting of the other experiments, where
# synchronous training does not polarize (docs/experiments.md): tau 0 / 8 / 32, and at tau 32 each remedy.
# The setting where synchronous training already polarizes: with and without the guard.
DEFAULT = [
    ("8 experts, lr 1e-3", 0, "none"),
    ("8 experts, lr 1e-3", 8, "none"),
    ("8 experts, lr 1e-3", 32, "none"),
    ("8 experts, lr 1e-3", 32, "gate dropout 10%"),
    ("8 experts, lr 1e-3", 32, "guard 10%"),
    ("4 experts, lr 1e-2", 0, "none"),
    ("4 experts, lr 1e-2", 0, "guard 10%"),
]
DIVERGED_AUC = 0.55  # a test AUC at or below this (or NaN) means the tower predicts (nearly) a constant


def cells(full: bool) -> list[tuple[str, int, str]]:
    """The (setting, tau, remedy) cells to run."""
    if not full:
        return DEFAULT
    return [(s, tau, r) for s in SETTINGS for tau in TAUS for r in REMEDIES]


def outcome(row: dict[str, Any]) -> dict[str, Any]:
    """One run's flat outcome: diverged / polarized (gatewatch's finding) / healthy, AUCs, finding steps."""
    aucs = {t: m.get("auc", math.nan) for t, m in row["test"].items()}
    diverged = "nonfinite" in row["findings"] or any(not a > DIVERGED_AUC for a in aucs.values())
    polarized = "polarization" in row["findings"]
    since = row["polarized_since"]
    first = {g: s for g, s in row["first_polarized"].items() if g in since}
    return {
        "setting": row["setting"], "tau": row["tau"], "remedy": row["remedy"], "seed": row["seed"],
        "diverged": diverged, "polarized": polarized and not diverged,
        "ever_polarized": bool(row["first_polarized"]) and not diverged,
        **{f"auc_{t}": a for t, a in aucs.items()},
        "largest_mean_share": max(row["top_share"].values()) if row["top_share"] else math.nan,
        "first_flag_step": min(first.values()) if first else None,
        "permanent_step": min(since.values()) if since else None,
        "sharp_routing": "sharp_routing" in row["findings"], "dead_expert": "dead_expert" in row["findings"],
        "collapse": "collapse" in row["findings"], "seconds": row["seconds"],
    }


def summarise(flat: pd.DataFrame) -> pd.DataFrame:
    """Per cell: runs, diverged, polarized (count, share), AUC mean and std, finding steps (median)."""
    keys = ["setting", "tau", "remedy"]
    auc = [c for c in flat.columns if c.startswith("auc_")]
    healthy = flat[~flat["diverged"]]
    out = flat.groupby(keys, sort=False).agg(
        runs=("seed", "size"), diverged=("diverged", "sum"), polarized=("polarized", "sum"),
        ever_polarized=("ever_polarized", "sum"), sharp_routing=("sharp_routing", "sum"),
        dead_expert=("dead_expert", "sum"), collapse=("collapse", "sum"),
        largest_mean_share=("largest_mean_share", "mean"), seconds=("seconds", "mean"),
    )
    out["rate"] = out["polarized"] / out["runs"]
    stats = healthy.groupby(keys, sort=False).agg(
        **{f"{c}_mean": (c, "mean") for c in auc}, **{f"{c}_std": (c, "std") for c in auc},
        first_flag_median=("first_flag_step", "median"), permanent_median=("permanent_step", "median"),
    )
    return out.join(stats).reset_index()


def comparisons(summary: pd.DataFrame) -> list[dict[str, Any]]:
    """Fisher's exact test (two-sided) on polarized vs not between cells that share a setting."""
    out = []
    for (_, a), (_, b) in combinations(summary.iterrows(), 2):
        if a["setting"] != b["setting"] or (a["tau"] != b["tau"] and a["remedy"] != b["remedy"]):
            continue
        pa, pb = int(a["polarized"]), int(b["polarized"])
        na, nb = int(a["runs"]) - pa, int(b["runs"]) - pb
        out.append({"setting": a["setting"], "a": f"tau {a['tau']}, {a['remedy']}", "b": f"tau {b['tau']}, "
                    f"{b['remedy']}", "polarized_a": f"{pa} of {pa + na}", "polarized_b": f"{pb} of {pb + nb}",
                    "fisher_p": fisher_exact(pa, na, pb, nb)})
    return out


COLOURS = {"none": "#636efa", "gate dropout 10%": "#ef553b", "guard 10%": "#00a67e"}


def grid(panels: int) -> tuple[int, int]:
    """Rows and columns of the figure's panels: two a row."""
    cols = min(2, panels)
    return -(-panels // cols), cols


def figure(summary: pd.DataFrame, steps: int) -> go.Figure:
    """One panel per setting: per tau, a bar per remedy, the share of runs polarized (solid, with its 95% Wilson
    interval and "k/n") and on top of it the share that diverged (hatched), which are not counted as polarized."""
    names = list(dict.fromkeys(summary["setting"]))
    rows, cols = grid(len(names))
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=names, shared_yaxes=True,
                        vertical_spacing=0.14, horizontal_spacing=0.06)
    for i, setting in enumerate(names):
        row, col = i // cols + 1, i % cols + 1
        cells = summary[summary["setting"] == setting]
        for remedy, part in cells.groupby("remedy", sort=False):
            x = [f"tau {t}" for t in part["tau"]]
            runs = part["runs"].astype(int)
            low, high = zip(*(wilson(int(k), int(n)) for k, n in zip(part["polarized"], runs, strict=True)),
                            strict=True)
            first, colour = i == 0, COLOURS.get(remedy)
            fig.add_bar(x=x, y=part["rate"], name=remedy, legendgroup=remedy, showlegend=first, offsetgroup=remedy,
                        marker_color=colour, row=row, col=col,
                        text=[f"{k}/{n}" for k, n in zip(part["polarized"].astype(int), runs, strict=True)],
                        textposition="outside", textfont={"size": 11}, cliponaxis=False,
                        error_y={"type": "data", "symmetric": False, "color": "#555", "thickness": 1,
                                 "array": [h - r for h, r in zip(high, part["rate"], strict=True)],
                                 "arrayminus": [r - lo for lo, r in zip(low, part["rate"], strict=True)]})
            fig.add_bar(x=x, y=part["diverged"] / runs, base=part["rate"], name=f"{remedy}: diverged",
                        legendgroup=remedy, showlegend=first and bool(summary["diverged"].any()),
                        offsetgroup=remedy, marker={"color": "white", "line": {"color": colour, "width": 1},
                                                    "pattern": {"shape": "/", "fgcolor": colour}},
                        row=row, col=col, hovertemplate="%{y:.0%} diverged<extra></extra>")
    diverged = "; hatched: diverged" if summary["diverged"].any() else ""
    fig.update_layout(title=f"Census MMoE: share of runs whose gates polarize ({steps} steps; solid: polarized, "
                            f"95% Wilson interval{diverged})",
                      barmode="group", bargap=0.25, legend={"title": {"text": "remedy"}, "font": {"size": 12}},
                      margin={"t": 90})
    fig.update_yaxes(range=[0, 1.12], tickformat=".0%")
    fig.update_yaxes(title_text="share of runs", col=1)
    fig.update_xaxes(title_text="gradient staleness tau (steps)", row=rows)
    return fig


def label_key(labels: dict[str, Any]) -> tuple[str, int, str, int]:
    """The identity of one run: (setting, tau, remedy, seed)."""
    return str(labels["setting"]), int(labels["tau"]), str(labels["remedy"]), int(labels["seed"])


def main() -> None:
    p = parser(__doc__.splitlines()[0], seeds=20, steps=1000)
    p.add_argument("--full", action="store_true", help="every setting x tau 0/8/32 x remedy (hours on 2 cores)")
    p.add_argument("--delay", choices=["fixed", "random"], default="fixed", help="staleness delay (default fixed)")
    p.add_argument("--resume", action="store_true", help="reuse the finished runs of the .jsonl file")
    args = p.parse_args()
    chosen = cells(args.full)
    jobs = [
        job({"setting": s, "tau": tau, "remedy": r, "seed": seed}, TrainConfig(
            model="mmoe", model_kwargs={"n_experts": SETTINGS[s][0]}, data="census", steps=args.steps,
            batch_size=256, lr=SETTINGS[s][1], seed=seed, staleness=tau, staleness_delay=args.delay,
            tensorboard=False, every=50, flush_every=100, **REMEDIES[r]))
        for seed in range(args.seeds) for s, tau, r in chosen
    ]
    stem = "staleness_polarization" + (f"_{args.tag}" if args.tag else "")
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / f"{stem}.jsonl"
    done = {}
    if args.resume and log.is_file():
        for line in log.read_text().splitlines():
            entry = json.loads(line)
            done[label_key(entry["row"])] = entry
    elif log.exists():
        log.unlink()
    if any(e["steps"] != args.steps or e["delay"] != args.delay for e in done.values()):
        raise SystemExit(f"{log} holds runs with other --steps/--delay: delete it or pass the same options.")
    todo = [j for j in jobs if label_key(j["labels"]) not in done]
    before = max((float(e["elapsed"]) for e in done.values()), default=0.0)  # wall time of the earlier run
    started = time.perf_counter()

    def keep(row: dict[str, Any]) -> None:
        with log.open("a") as f:
            entry = {"row": row, "steps": args.steps, "delay": args.delay,
                     "elapsed": before + time.perf_counter() - started}
            f.write(json.dumps(entry, default=str) + "\n")

    fresh = {label_key(r): r for r in run_all(todo, args.workers, keep)} if todo else {}
    wall = before + time.perf_counter() - started
    rows = [fresh.get(label_key(j["labels"])) or done[label_key(j["labels"])]["row"] for j in jobs]
    flat = pd.DataFrame([outcome(r) for r in rows])
    for r, f in zip(rows, flat.to_dict("records"), strict=True):
        r.update({k: f[k] for k in ("diverged", "polarized", "ever_polarized", "first_flag_step", "permanent_step")})
    summary = summarise(flat)
    tests = comparisons(summary)
    write_results(rows, args.out, stem, settings(
        args, wall_seconds=wall, cells=chosen, settings={k: list(v) for k, v in SETTINGS.items()},
        diverged_auc=DIVERGED_AUC, summary=summary.to_dict("records"), fisher=tests))
    summary.to_csv(args.out / f"{stem}_summary.csv", index=False)
    with pd.option_context("display.width", 250, "display.max_columns", 30):
        print(summary.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        print(pd.DataFrame(tests).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"wall time {wall:.0f} s")
    rows, _ = grid(summary["setting"].nunique())
    save_figure(figure(summary, args.steps), args.out, stem, width=1100, height=380 + 320 * rows)


if __name__ == "__main__":
    main()
