"""Charts the stages log to MLflow (rendered off-screen with matplotlib's Agg backend)."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def line_chart(lines: list[tuple[str, list, list, str]], path: Path, xlabel: str, ylabel: str, title: str):
    """One chart of `(label, xs, ys, style)` lines, saved to `path`; returns the figure."""
    fig, ax = pyplot().subplots(figsize=(7, 4))
    for label, xs, ys, style in lines:
        ax.plot(xs, ys, style, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return fig


def publish(tracker, figure, name: str) -> None:
    """Log `figure` to the tracker as `name`, then free it (pyplot keeps every open figure alive)."""
    tracker.log_figure(figure, name)
    pyplot().close(figure)
