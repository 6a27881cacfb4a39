"""The report's figure: one panel per quantity a run logged, each run a color of its own."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bigscale.report.runs import Run


@dataclass(frozen=True)
class Panel:
    title: str
    keys: tuple[str, ...]
    log_y: bool = False


FIXED_PANELS = (
    Panel("Loss", ("loss", "eval_loss")),
    Panel("Learning rate", ("lr",)),
    Panel("Gradient norm", ("grad_norm",), log_y=True),
    Panel("Tokens/s", ("tokens_per_s", "real_tokens_per_s")),
    Panel("Real-token share", ("real_token_share",)),
    Panel("Skipped steps and loss spikes (total)", ("skipped_steps", "loss_spikes")),
)
# Logged numbers that are no quality metric (timing, memory, counters, the schedule).
_NOT_EVAL = {
    "step", "epoch", "eval_ppl", "step_time_s", "data_wait_s", "forward_backward_s",
    "optimizer_s", "peak_mem_gib", "mfu", "exact_match_budget_hits", "harness/step",
}  # fmt: skip
GENERATION_TITLE = "Generation and harness metrics"
LINE_STYLES = ("-", "--", ":", "-.")


def eval_keys(runs: list[Run]) -> tuple[str, ...]:
    """Metrics of the generation eval, ``eval.metric_fn`` and ``bigscale eval`` over steps."""
    fixed = {k for panel in FIXED_PANELS for k in panel.keys}
    keys: dict[str, None] = {}
    for run in runs:
        for row in run.rows:
            for key, value in row.items():
                if (
                    key in fixed
                    or key in _NOT_EVAL
                    or key.startswith("final/")
                    or key.endswith(("_before", "_after"))
                    or not isinstance(value, (int, float))
                    or isinstance(value, bool)
                ):
                    continue
                keys[key] = None
    return tuple(keys)


def panels(runs: list[Run]) -> list[Panel]:
    """The panels with something to draw: a quantity no run logged gets none."""
    found = [p for p in FIXED_PANELS if any(run.series(k)[0] for run in runs for k in p.keys)]
    extra = eval_keys(runs)
    if extra:
        found.append(Panel(GENERATION_TITLE, extra))
    return found


def run_colors(count: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(count)]


def build_figure(runs: list[Run]) -> Any:
    """A matplotlib Figure (Agg, no display needed) of every panel for every run."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    chosen = panels(runs)
    cols = 2 if len(chosen) > 1 else 1
    rows = max(1, -(-len(chosen) // cols))
    fig = Figure(figsize=(7 * cols, 3.6 * rows), layout="constrained")
    colors = run_colors(len(runs))
    for i, panel in enumerate(chosen):
        ax = fig.add_subplot(rows, cols, i + 1)
        _draw(ax, panel, runs, colors)
    return fig


def _draw(ax: Any, panel: Panel, runs: list[Run], colors: list[Any]) -> None:
    from matplotlib.ticker import MaxNLocator

    drawn = False
    for run, color in zip(runs, colors, strict=True):
        for style, key in zip(LINE_STYLES * 8, panel.keys, strict=False):
            steps, values = run.series(key)
            if not steps:
                continue
            label = f"{run.label}: {key}" if len(runs) > 1 else key
            marker = "o" if len(steps) < 3 else None  # a single eval still shows
            ax.plot(steps, values, style, color=color, label=label, marker=marker, lw=1.6)
            drawn = True
        if panel.keys[0] == "loss":
            _mark_spikes(ax, run, color)
    ax.set_title(panel.title)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if (
        panel.log_y
        and drawn
        and all(v > 0 for run in runs for k in panel.keys for v in run.series(k)[1])
    ):
        ax.set_yscale("log")
    if drawn:
        ax.legend(fontsize="small")


def _mark_spikes(ax: Any, run: Run, color: Any) -> None:
    """A cross on the loss curve where a spike or a skipped step was counted."""
    steps, losses = run.series("loss")
    loss_at = dict(zip(steps, losses, strict=True))
    marks: list[tuple[float, float]] = []
    for key in ("loss_spikes", "skipped_steps"):
        s, v = run.series(key)
        marks += [(x, loss_at[x]) for x, prev, cur in zip(s[1:], v, v[1:], strict=False)
                  if cur > prev and x in loss_at]  # fmt: skip
    if marks:
        xs, ys = zip(*marks, strict=True)
        ax.scatter(xs, ys, marker="x", s=60, color=color, zorder=3)
