"""Run manifests: what ran, on what, with which data and code."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from importlib import metadata

from fmnist.config import PROJECT_ROOT, REPORTS_DIR

# The committed reference artifacts, as a path inside the checkout.
REPORTS_IN_CHECKOUT = REPORTS_DIR.relative_to(PROJECT_ROOT).as_posix()

# The packages whose versions decide a result.
TRACKED_PACKAGES = (
    "fmnist",
    "tensorflow",
    "keras",
    "keras-tuner",
    "numpy",
    "scikit-learn",
    "papermill",
    "nbconvert",
    "matplotlib",
    "seaborn",
    "ai-edge-litert",
)


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_state() -> dict[str, str | bool | None]:
    """The commit of the checkout and whether it had uncommitted changes."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10, check=True
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip()

    commit = git("rev-parse", "HEAD")
    # The run rewrites the committed reference artifacts under reports/: only changes elsewhere
    # (code, notebooks, params) make the checkout dirty.
    status = git("status", "--porcelain", "--untracked-files=no", "--", ".", f":(exclude){REPORTS_IN_CHECKOUT}")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


# The instruction-set extensions that decide how fast TensorFlow trains here (bf16 and AMX: 2-5x).
CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
CPUINFO = "/proc/cpuinfo"
# /proc/cpuinfo's numbers of a CPU's generation, and the keys the machine record gives them.
CPU_GENERATION_KEYS = {"cpu family": "family", "model": "model", "stepping": "stepping"}


def machine() -> dict[str, object]:
    """The CPU model, its cores and the extensions that matter: timings mean little without them."""
    model, flags = platform.processor() or platform.machine(), set()
    # The model name alone does not tell CPU generations apart ("AMD EPYC" is both a Zen 3 and a Zen 4 here):
    # the family, model and stepping numbers do.
    generation: dict[str, int] = {}
    try:
        with open(CPUINFO) as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
                elif key in CPU_GENERATION_KEYS and CPU_GENERATION_KEYS[key] not in generation:
                    number = value.strip()
                    if number.isdigit():
                        generation[CPU_GENERATION_KEYS[key]] = int(number)
    except OSError:
        pass
    features = [name for name in CPU_FEATURES if name in flags]
    return {
        "cpu": model,
        **generation,
        "cores": os.cpu_count(),
        "architecture": platform.machine(),
        "features": features,
        # What a recipe with precision "auto" trains in here (fmnist.training.resolve_precision).
        "auto_precision": auto_precision(features),
    }


def auto_precision(features) -> str:
    """bfloat16 mixed precision where the CPU computes bf16 natively (AVX512-BF16 or AMX-BF16), else float32."""
    return "bfloat16" if {"avx512_bf16", "amx_bf16"} & set(features) else "float32"


def describe_machine(record: dict[str, object] | None = None) -> str:
    """One line for logs and the report, e.g. "AMD EPYC (family 25, model 17), 2 cores (avx2, fma)"; records
    made before the family and model were kept give the name alone."""
    record = record or machine()
    features = ", ".join(record.get("features") or []) or "no AVX2"
    cpu = str(record.get("cpu"))
    if record.get("family") is not None and record.get("model") is not None:
        cpu += f" (family {record['family']}, model {record['model']})"
    return f"{cpu}, {record.get('cores')} cores ({features})"


def environment() -> dict[str, object]:
    """Everything about the machine and software that a rerun should match."""
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": platform.machine(),
        "machine": machine(),
        "packages": package_versions(),
        "git": git_state(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
