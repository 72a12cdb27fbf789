"""The bench's PNG chart: it/s per variant (with the speed-up over eager) beside first-call time."""

from __future__ import annotations

import textwrap


def plot_rows(rows: list[dict], path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    names = [r["variant"] for r in rows]
    speeds = [r.get("it_per_s") or 0.0 for r in rows]
    firsts = [r.get("first_call_s") or 0.0 for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(rows) + 4), 4.8))
    bars = ax1.bar(names, speeds, color=["#888" if n == "eager" else "#3b7dd8" for n in names])
    for bar, r in zip(bars, rows, strict=True):
        skipped = str(r.get("error") or "").startswith("skipped")
        if not r["ok"]:
            label = "skipped" if skipped else "failed"
        else:
            label = f"{r['speedup_vs_eager']:.2f}x" if r.get("speedup_vs_eager") else ""
        ax1.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom")
    ax1.set_ylabel("it/s (median of timed runs)")
    ax1.set_title("sampling speed")
    ax2.bar(names, firsts, color="#d88b3b")
    ax2.set_ylabel("seconds")
    ax2.set_title("first call (includes compilation)")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", rotation=30)
    if title:
        fig.suptitle("\n".join(textwrap.wrap(title, 110)), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
