"""Pictures of a finished job, written next to its report: people read an allocation from a picture.

- `allocation.png`: the rank each matrix kept, per layer and matrix type, as a share of its full
  rank (left) and as the share of its parameters it stores (right; 1 = dense);
- `spectra.png`: every matrix's relative truncation loss against the share of its rank kept, from
  the whitened singular values the job itself factored (OUT_DIR/spectra), one line per layer coloured
  by depth and one panel per matrix type, with the kept rank marked.

Both come from the report and the spectra alone (`plots(report, read_spectra(OUT_DIR/spectra))`
redraws them for any finished output). matplotlib draws off-screen (Agg); the PNGs carry no software or date metadata,
so the same job draws the same bytes.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np

ALLOCATION_PNG = "allocation.png"
SPECTRA_PNG = "spectra.png"
_LAYER = re.compile(r"\.(\d+)\.")
# Types in the decoder's usual order; any other leaf name after them, alphabetically. Fixed, so a report read
# back from JSON (keys sorted) draws the same bytes as the one the job held.
_ORDER = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj", "gate_up_proj", "down_proj")


def _by_type(modules: dict) -> dict[str, list[tuple[int, str, dict]]]:
    """matrix type -> [(layer, name, record)] in layer order, the types in _ORDER (whatever the dict's order)."""
    out: dict[str, list] = {}
    for name, rec in modules.items():
        m = _LAYER.search(name)
        out.setdefault(name.rpartition(".")[2], []).append((int(m.group(1)) if m else 0, name, rec))
    rank = {t: i for i, t in enumerate(_ORDER)}
    return {k: sorted(out[k], key=lambda row: row[:2]) for k in sorted(out, key=lambda t: (rank.get(t, len(rank)), t))}


def _title(report: dict) -> str:
    alloc = (report.get("allocation") or {}).get("alloc", "uniform")
    req = report.get("ratio_requested")
    want = f"--ratio {req}" if req is not None else "quality target"
    return (f"{Path(str(report.get('model_dir', ''))).name}: {want}, --alloc {alloc}, {report.get('factors', '')} factors; "
            f"linears ratio {report['ratio_linear']:.3f}")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    return buf.getvalue()


def allocation_png(report: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    types = _by_type(report["modules"])
    # A fixed layout: constrained_layout measured most of the drawing time (every tick label's box, twice).
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.12, top=0.88, wspace=0.18)
    for t, rows in types.items():
        layers = [layer for layer, _, _ in rows]
        rank = [rec["rank"] / min(rec["in_features"], rec["out_features"]) for _, _, rec in rows]
        kept = [rec["stored_numel"] / (rec["in_features"] * rec["out_features"]) for _, _, rec in rows]
        axes[0].plot(layers, rank, marker=".", label=t)
        axes[1].plot(layers, kept, marker=".", label=t)
    axes[0].set_ylabel("rank kept / full rank")
    axes[1].set_ylabel("parameters stored / dense")
    budget = 1 - report["ratio_linear"]
    axes[1].axhline(budget, color="k", lw=0.8, ls="--", label=f"all linears: {budget:.3f}")
    for ax in axes:
        ax.set_xlabel("layer")
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, ncol=2)
    fig.suptitle(_title(report), fontsize=10)
    data = _png(fig)
    plt.close(fig)
    return data


def spectra_png(report: dict, spectra: dict[str, np.ndarray]) -> bytes:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullLocator

    types = {t: [r for r in rows if r[1] in spectra] for t, rows in _by_type(report["modules"]).items()}
    types = {t: rows for t, rows in types.items() if rows}
    cols = min(4, max(1, len(types)))
    nrows = -(-len(types) // cols) if types else 1
    # A fixed layout and a shared, sparsely ticked log axis: constrained_layout and log-scale minor ticks were
    # 2-4 s of a 3-5 s drawing on 2 cores; this draws the same picture in well under a second.
    fig, axes = plt.subplots(nrows, cols, figsize=(3.4 * cols + 0.8, 3.0 * nrows + 0.4), squeeze=False, sharey=True)
    fig.subplots_adjust(left=0.08, right=0.88, bottom=0.12 / nrows + 0.04, top=1 - 0.3 / (3.0 * nrows + 0.4) - 0.04,
                        wspace=0.12, hspace=0.45)
    depth = max((layer for rows in types.values() for layer, _, _ in rows), default=0) or 1
    cmap = plt.get_cmap("viridis")
    for ax, (t, rows) in zip(axes.flat, types.items()):
        for layer, name, rec in rows:
            s2 = np.asarray(spectra[name], dtype=np.float64) ** 2
            total = s2.sum()
            if total <= 0:
                continue
            tail = np.concatenate([total - np.cumsum(s2), [0.0]])[:-1] / total  # loss at rank 0 .. full-1
            x = np.arange(len(tail)) / len(s2)
            color = cmap(layer / depth)
            ax.semilogy(x, np.maximum(tail, 1e-12), color=color, lw=0.8)
            r = rec["rank"]
            if r < len(s2):
                ax.semilogy([r / len(s2)], [max(tail[r], 1e-12)], "o", color=color, ms=3)
        ax.set_title(t, fontsize=9)
        ax.set_xlabel("rank / full rank")
        ax.set_ylim(1e-6, 1.5)
        ax.set_xlim(0, 1)
        ax.yaxis.set_major_locator(LogLocator(base=10, numticks=4))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("relative truncation loss")
    for ax in list(axes.flat)[len(types):]:
        ax.axis("off")
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, depth))
    fig.colorbar(sm, cax=fig.add_axes((0.91, 0.2, 0.015, 0.6)), label="layer")
    fig.suptitle(_title(report) + "; dots: the rank kept", fontsize=9)
    data = _png(fig)
    plt.close(fig)
    return data


def read_spectra(spectra_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out: dict[str, np.ndarray] = {}
    for path in sorted(Path(spectra_dir).glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


def plots(report: dict, spectra: dict[str, np.ndarray]) -> dict[str, bytes]:
    """File name -> PNG bytes for a finished job's report and spectra."""
    if not report.get("modules"):
        return {}
    return {ALLOCATION_PNG: allocation_png(report), SPECTRA_PNG: spectra_png(report, spectra)}
