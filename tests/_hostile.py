"""Helpers for the hostile-input tests: run the real CLI entry point, check its one error line,
and check that a refused command wrote nothing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from maskattn_deploy.cli.main import main


def _exit_code(args: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    """Run ``maskattn-deploy ARGS`` in this process; its exit code."""
    monkeypatch.setattr(sys, "argv", ["maskattn-deploy", *args])
    try:
        main()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def run_cli(args: list[str], monkeypatch: pytest.MonkeyPatch, capsys) -> tuple[int, str]:
    """``maskattn-deploy ARGS`` in this process; returns (exit code, stderr).

    An exception other than SystemExit escapes: that is a traceback a user would see.
    """
    capsys.readouterr()
    code = _exit_code(args, monkeypatch)
    return code, capsys.readouterr().err


def run_generate(monkeypatch: pytest.MonkeyPatch, capsys, *args: str) -> tuple[int, str, str]:
    """``maskattn-deploy generate ARGS``; (exit code, stdout, last stderr line).

    The output read includes whatever the test printed before (capsys is not cleared first).
    """
    code = _exit_code(["generate", *args], monkeypatch)
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    return code, out.out, lines[-1] if lines else ""


def assert_one_line_error(err: str, *needles: str) -> str:
    """Exactly one ``error:`` line, the last one, no traceback; it contains every needle."""
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert not any("Traceback" in line for line in lines), err
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"
    return errors[0]


def tree(*roots: Path) -> set[str]:
    """Every path under ``roots`` (files and folders), to compare before and after a command."""
    found: set[str] = set()
    for root in roots:
        if root.exists():
            found |= {str(p) for p in root.rglob("*")}
    return found


def refused(
    args: list[str], monkeypatch: pytest.MonkeyPatch, capsys, watch: list[Path], *needles: str
) -> str:
    """Run ARGS; assert exit 2, one error line with ``needles``, nothing new under ``watch``."""
    before = tree(*watch)
    code, err = run_cli(args, monkeypatch, capsys)
    assert code == 2, f"exit {code} for {args}: {err}"
    line = assert_one_line_error(err, *needles)
    written = tree(*watch) - before
    assert not written, f"{args} wrote {sorted(written)}"
    return line
