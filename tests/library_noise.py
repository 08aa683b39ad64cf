"""What TensorFlow, LiteRT and the converter write on their own: the tests check none of it reaches a reader."""

from __future__ import annotations

import json
import re
from pathlib import Path

# Lines that only those libraries write; none of it belongs on a reader's screen.
LIBRARY_NOISE = re.compile(
    r"absl::InitializeLog|^[IWE]\d{4} |cuInit|NodeDef mentions|Created TensorFlow Lite|Assets written to|"
    r"Saved artifact at|UserWarning|fully_quantize|Input Notebook|Kernel is running over TCP|Captures:|Reloading Tuner",
    re.MULTILINE,
)


def noisy_outputs(notebook: Path) -> list[str]:
    """The printed outputs (stdout or stderr) of an executed notebook that carry library noise."""
    found = []
    for index, cell in enumerate(json.loads(notebook.read_text())["cells"]):
        for output in cell.get("outputs", []):
            text = "".join(output.get("text", ""))
            if output.get("output_type") == "stream" and LIBRARY_NOISE.search(text):
                found.append(f"{notebook.name} cell {index}: {text[:160]!r}")
    return found
