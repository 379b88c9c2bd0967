"""One way every benchmark reports: the device line, then JSON (rows + metadata) and a
Markdown table side by side in the results folder."""
import datetime
import json
import os

import torch


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__})"


def save(out, stem, rows, table, device, **meta):
    """Write OUT/STEM.json ({device, date, torch, ...meta, rows}) and OUT/STEM.md (table)."""
    os.makedirs(out, exist_ok=True)
    record = {"device": device_name(device), "date": datetime.date.today().isoformat(),
              "torch": torch.__version__, **meta, "rows": rows}
    with open(os.path.join(out, f"{stem}.json"), "w") as f:
        json.dump(record, f, indent=1)
    with open(os.path.join(out, f"{stem}.md"), "w") as f:
        f.write(table + "\n")
