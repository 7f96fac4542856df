#!/usr/bin/env python3
"""Record and guard the versions inside the megaspan image (run at build time by the Dockerfile).

    record_versions.py                      # print a versions report (-> /opt/megaspan/versions.txt)
    record_versions.py --write-pins FILE    # pin the image's protected packages (name==version)
    record_versions.py --check-pins FILE    # exit 1 if any protected package changed since then
    record_versions.py --require NAME...    # exit 1 if a distribution (or module:NAME) is missing

No GPU is needed: versions come from package metadata, and imports are only attempted for the
report (a failing import is reported, not fatal, because TE needs a driver to import).
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os
import platform
import re
import sys

# Distributions the image ships that pip must never replace (NVIDIA builds, ABI-coupled).
PROTECTED = re.compile(
    r"^(torch|torchvision|torchaudio|transformer[-_]engine.*|triton|pytorch[-_]triton|numpy|"
    r"apex|flash[-_]attn.*|nvidia[-_].*|cuda[-_]python|cupy.*|nvfuser.*)$",
    re.IGNORECASE,
)


def installed() -> dict[str, str]:
    out = {}
    for dist in md.distributions():
        name = dist.metadata["Name"]
        if name:
            out[re.sub(r"[-_.]+", "-", name).lower()] = dist.version
    return out


def protected() -> dict[str, str]:
    return {n: v for n, v in sorted(installed().items()) if PROTECTED.match(n)}


def write_pins(path: str) -> int:
    pins = protected()
    with open(path, "w") as f:
        f.write("# Packages of the base image that must not change (written by record_versions.py).\n")
        for name, version in pins.items():
            f.write(f"{name}=={version}\n")
    print(f"pinned {len(pins)} packages of the base image in {path}")
    return 0


def check_pins(path: str) -> int:
    now = installed()
    bad = []
    with open(path) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            name, version = line.split("==", 1)
            if now.get(name) != version:
                bad.append(f"{name}: {version} -> {now.get(name, 'removed')}")
    if bad:
        print("base-image packages changed:\n  " + "\n  ".join(bad), file=sys.stderr)
        return 1
    return 0


def version_of(dist_names: list[str]) -> str:
    have = installed()
    for name in dist_names:
        if name in have:
            return have[name]
    return "absent"


def try_import(expr: str) -> str:
    module, _, attr = expr.partition(":")
    try:
        obj = importlib.import_module(module)
        for part in attr.split(".") if attr else []:
            obj = getattr(obj, part)
        if callable(obj):
            obj = obj()
        return str(obj) if attr else "ok"
    except Exception as exc:  # noqa: BLE001 - a report, not a check
        return f"import failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"


def report() -> int:
    rows = [
        ("megaspan_version", os.environ.get("MEGASPAN_VERSION", version_of(["megaspan"]))),
        ("base_image", os.environ.get("MEGASPAN_BASE_IMAGE", os.environ.get("NVIDIA_PYTORCH_VERSION", "?"))),
        ("nvidia_pytorch_version", os.environ.get("NVIDIA_PYTORCH_VERSION", "?")),
        ("cuda_toolkit (image)", os.environ.get("CUDA_VERSION", "?")),
        ("python", platform.python_version()),
        ("torch", version_of(["torch"])),
        ("torch.version.cuda", try_import("torch:version.cuda")),
        ("torch.cudnn", try_import("torch:backends.cudnn.version")),
        (
            "transformer_engine",
            version_of(
                [
                    "transformer-engine",
                    "transformer-engine-torch",
                    "transformer-engine-cu13",
                    "transformer-engine-cu12",
                ]
            ),
        ),
        ("megatron_core", version_of(["megatron-core"])),
        ("megatron.core import", try_import("megatron.core:__version__")),
        ("apex", version_of(["apex"])),
        ("triton", version_of(["triton", "pytorch-triton"])),
        ("numpy", version_of(["numpy"])),
        ("megaspan", version_of(["megaspan"])),
        ("megaspan import", try_import("megaspan")),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def require(names: list[str]) -> int:
    """Exit status 1 naming every expected distribution (``transformer-engine``) or importable
    module (``module:fused_weight_gradient_mlp_cuda``, found, not imported: a CUDA extension
    needs a driver to import) that the image lacks: a build that lost one fails here."""
    import importlib.util

    have = installed()
    missing = []
    for name in names:
        if name.startswith("module:"):
            module = name.split(":", 1)[1]
            if importlib.util.find_spec(module) is None:
                missing.append(name)
        elif not any(dist in have for dist in _dist_names(name)):
            missing.append(name)
    if missing:
        print("the image lacks expected packages: " + ", ".join(missing), file=sys.stderr)
        return 1
    print(f"all {len(names)} expected packages present")
    return 0


def _dist_names(name: str) -> list[str]:
    """Normalized distribution names that count as ``name`` (TE ships under a few)."""
    name = re.sub(r"[-_.]+", "-", name).lower()
    if name == "transformer-engine":
        return [name, "transformer-engine-torch", "transformer-engine-cu13", "transformer-engine-cu12"]
    return [name]


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "--write-pins":
        return write_pins(argv[1])
    if len(argv) == 2 and argv[0] == "--check-pins":
        return check_pins(argv[1])
    if len(argv) >= 2 and argv[0] == "--require":
        return require(argv[1:])
    if not argv:
        return report()
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
