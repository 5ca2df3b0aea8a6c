"""Benchmarks (`make bench`): each module measures one part and records its figures with `record`."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

from daychat.io import write_json


def record(path: Path, results: dict[str, dict]) -> None:
    """Merge `results` (key -> figures) into the JSON file at `path`, each stamped with the machine and the
    time; keys that other benchmarks wrote there are kept."""
    stamp = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
             "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    data = json.loads(path.read_text()) if path.is_file() else {}
    for key, figures in results.items():
        data[key] = {**figures, **stamp}
    write_json(path, data)


def quality_filters_on(section: dict) -> dict:
    """A `quality` params section with language ID and every heuristic but the score switched on, its
    thresholds kept: what the quality benchmarks measure, whether or not the recipe runs them (params.yaml
    has them off until the filter ablation shows they help)."""
    from daychat.sections import QualityParams

    return {**section, "lid": True, "heuristics": QualityParams().heuristics}
