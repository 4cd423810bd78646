"""The `charrnn` command's entry point: set up the allocator, then run the CLI.

XLA allocates each compiled call's temporaries as one large block, which glibc maps
fresh and unmaps after the call; on 4 KiB pages every training step pays for it in
page faults, which huge pages (the `glibc.malloc.hugetlb=1` tunable) avoid. glibc
reads tunables only at process start, so heavy commands re-run the process once
with the tunable set, before anything heavy is imported.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLES_ENV = "GLIBC_TUNABLES"
HUGE_PAGES = "glibc.malloc.hugetlb=1"
HEAVY_COMMANDS = {"train", "eval", "bench"}


def environment_with_huge_pages(environ: dict[str, str], libc: str) -> dict[str, str] | None:
    """The environment to re-run with, or None when glibc is absent or the tunable is set already."""
    tunables = environ.get(TUNABLES_ENV, "")
    if libc != "glibc" or "glibc.malloc.hugetlb" in tunables:
        return None
    return {**environ, TUNABLES_ENV: ":".join(part for part in (tunables, HUGE_PAGES) if part)}


def rerun_with_huge_pages() -> None:
    """Replace this process by the same command line with huge-page allocations (Linux + glibc only)."""
    environ = environment_with_huge_pages(dict(os.environ), platform.libc_ver()[0])
    if environ is not None and sys.platform.startswith("linux"):
        sys.stdout.flush()
        os.execve(sys.executable, sys.orig_argv, environ)


def main() -> None:
    command = next((arg for arg in sys.argv[1:] if not arg.startswith("-")), None)
    if command in HEAVY_COMMANDS:
        rerun_with_huge_pages()
    from charrnn.cli import main as cli_main

    cli_main()
