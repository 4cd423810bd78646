"""The entry point re-runs training commands with huge-page allocations, and nothing else."""

import io
import sys

import pytest

from charrnn import entry


def test_environment_adds_the_tunable_and_keeps_existing_ones():
    assert entry.environment_with_huge_pages({}, "glibc")[entry.TUNABLES_ENV] == entry.HUGE_PAGES
    merged = entry.environment_with_huge_pages({entry.TUNABLES_ENV: "glibc.malloc.arena_max=2", "X": "1"}, "glibc")
    assert merged == {entry.TUNABLES_ENV: f"glibc.malloc.arena_max=2:{entry.HUGE_PAGES}", "X": "1"}


@pytest.mark.parametrize("environ, libc", [({entry.TUNABLES_ENV: "glibc.malloc.hugetlb=0"}, "glibc"), ({}, ""), ({}, "musl")])
def test_no_rerun_when_set_already_or_without_glibc(environ, libc):
    assert entry.environment_with_huge_pages(environ, libc) is None


class Replaced(Exception):
    pass


@pytest.fixture
def execs(monkeypatch):
    """The os.execve calls the entry point makes, on Linux with glibc and the tunable unset."""
    calls = []

    def execve(path, args, environ):
        calls.append((path, args, environ))
        raise Replaced

    monkeypatch.setattr(entry.os, "execve", execve)
    monkeypatch.setattr(entry.platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.setattr(entry.sys, "platform", "linux")
    monkeypatch.delenv(entry.TUNABLES_ENV, raising=False)
    monkeypatch.setattr("charrnn.cli.main", lambda: None)
    return calls


@pytest.mark.parametrize("argv, reruns", [(["charrnn", "train", "x.txt"], True), (["charrnn", "--quiet", "eval"], True),
                                          (["charrnn", "sample", "--length", "5"], False), (["charrnn"], False)])
def test_main_reruns_only_heavy_commands(argv, reruns, execs, monkeypatch):
    monkeypatch.setattr(entry.sys, "argv", argv)
    if reruns:
        with pytest.raises(Replaced):
            entry.main()
        path, args, environ = execs[0]
        assert path == sys.executable and list(args) == list(sys.orig_argv)
        assert environ[entry.TUNABLES_ENV] == entry.HUGE_PAGES
    else:
        entry.main()
        assert execs == []


def test_no_rerun_off_linux_even_with_glibc(execs, monkeypatch):
    # elsewhere (Windows) os.execve starts a new process and ends the old one, so the shell sees the command end at once
    monkeypatch.setattr(entry.sys, "platform", "win32")
    monkeypatch.setattr(entry.sys, "argv", ["charrnn", "train", "x.txt"])
    entry.main()
    assert execs == []


def test_output_written_before_the_rerun_is_not_lost(execs, monkeypatch):
    # the replaced process takes its unflushed stdout buffer with it
    written, seen_by_the_rerun = io.BytesIO(), []
    monkeypatch.setattr(entry.sys, "stdout", io.TextIOWrapper(written, encoding="utf-8"))
    monkeypatch.setattr(entry.sys, "argv", ["charrnn", "train", "x.txt"])
    monkeypatch.setattr(entry.os, "execve", lambda *_: seen_by_the_rerun.append(written.getvalue()))
    print("before")
    entry.main()
    assert seen_by_the_rerun == [b"before\n"]
