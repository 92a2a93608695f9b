"""metrics.jsonl, the loss plot and MFU."""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import torch

# Dense bf16 tensor-core peak FLOP/s (without sparsity) by a name in the device's name, matched as a
# whole word ("L4" is not the L40's) and in this order (a variant before its family). None: a device
# whose peak is not listed (no MFU rather than one against another card's peak).
PEAK_BF16_FLOPS = {
    "H100 PCIe": 756e12,
    "H100 NVL": None,
    "H200": 989e12,
    "GH200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "A10G": 70e12,
    "L40S": 362e12,
    "L40": None,
    "L4": 121e12,
    "A6000": 155e12,
    "4090": 165e12,
    "3090": 71e12,
}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, val in PEAK_BF16_FLOPS.items():
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", name):
            return val
    return None


def read_metrics(path: str | Path) -> list[dict]:
    """The records of metrics.jsonl; a line cut short (a process killed while appending) is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def truncate_metrics(path: str | Path, last_step: int) -> None:
    """Drop records after `last_step` (logged by a run that died after its last checkpoint)."""
    path = Path(path)
    rows = [r for r in read_metrics(path) if r.get("step", 0) <= last_step]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def plot_loss(metrics_path: str | Path, png_path: str | Path, title: str = "") -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("fastformer: matplotlib is not installed; loss.png not written")
        return

    rows = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(7, 4))
    tr = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    ev = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    if tr:
        ax.plot(*zip(*tr), label="train loss")
    if ev:
        ax.plot(*zip(*ev), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if tr or ev:
        ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


@contextlib.contextmanager
def loss_plot_on_stop(out: str | Path, title: str, main: bool = True):
    """Around `trainer.train()`: a run stopped early (Ctrl-C, SIGTERM, an error) still leaves loss.png
    with its curve so far, next to the checkpoint it saved; a finished run is plotted by its pipeline."""
    try:
        yield
    except BaseException:
        if main and (Path(out) / "metrics.jsonl").is_file():
            try:
                plot_loss(Path(out) / "metrics.jsonl", Path(out) / "loss.png", title=title)
            except Exception:  # noqa: BLE001 - the plot must never hide why the run stopped
                pass
        raise
