"""Numbers that are accepted but mean nothing are refused, with the allowed range.

Every command that takes a number gets values outside its range (0 steps, an infinite or NaN
guidance, a seed torch cannot take, sizes the UNet or the export cannot run...): exit code 2,
one ``error:`` line naming the flag, no traceback, nothing written. The library checks the
same values where it receives them, so Python callers get the same refusal naming the
parameter (a ``ValueError``).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from _hostile import refused

from maskattn_deploy.errors import InvalidValueError, UserError
from maskattn_deploy.models.tiny import cache_root

PROMPT = "a red cube"
HUGE = str(10**23)

# command -> [(extra args, flag the message names)]; {exp} is the cached tiny export.
CASES: dict[str, list[tuple[list[str], str]]] = {
    "generate": [
        (["--steps", "0"], "--steps"),
        (["--steps", "1001"], "--steps"),
        (["--guidance", "inf"], "--guidance"),
        (["--guidance", "nan"], "--guidance"),
        (["--guidance", "-1"], "--guidance"),
        (["--seed", HUGE], "--seed"),
        (["--seed", "-1"], "--seed"),
        (["--height", "136"], "--height"),  # a multiple of 8, not of the UNet's 32
        (["--height", "100"], "--height"),
        (["--width", "100000"], "--width"),
        (["--height", "512"], "--height"),  # outside the tiny export's 128..384
        (["--num-images", "0"], "--num-images"),
        (["--num-images", "65"], "--num-images"),
        (["--steps", "abc"], "--steps"),
    ],
    "generate --backend torch": [
        (["--height", "136"], "--height"),
        (["--width", "8192"], "--width"),
        (["--guidance", "nan"], "--guidance"),
        (["--seed", HUGE], "--seed"),
    ],
    "parity": [
        (["--steps", "0"], "--steps"),
        (["--seed", HUGE], "--seed"),
        (["--shapes", "0x256x256"], "--shapes"),
        (["--shapes", "2x136x256"], "--shapes"),
        (["--shapes", "2x512x512"], "--shapes"),  # outside the export's range
        (["--shapes", "2x99999x256"], "--shapes"),
    ],
    "bench": [
        (["--repeats", "0"], "--repeats"),
        (["--warmup", "-1"], "--warmup"),
        (["--steps", "0"], "--steps"),
        (["--e2e-repeats", "0"], "--e2e-repeats"),
        (["--threads", "0"], "--threads"),
        (["--shapes", "2x136x256"], "--shapes"),
    ],
    "demo": [(["--train-steps", "0"], "--train-steps"), (["--steps", "0"], "--steps")],
    "selftest --dry-run": [
        (["--budget-s", "nan"], "--budget-s"),
        (["--budget-s", "inf"], "--budget-s"),
        (["--seed", "-1"], "--seed"),
    ],
    "build": [
        (["--workspace-gib", "0"], "--workspace-gib"),
        (["--opt-level", "9"], "--opt-level"),
        (["--kernel-tiling", "0,1"], "--kernel-tiling"),
    ],
    "export": [(["--external-data-threshold", "-1"], "--external-data-threshold")],
    "serve": [(["--max-steps", "0"], "--max-steps"), (["--max-steps", "1001"], "--max-steps")],
    "export-triton": [(["--max-steps", "1001"], "--max-steps")],
    "train": [
        (["--max-steps", "0"], "--max-steps"),
        (["train.steps=0"], "train.steps"),
        (["optim.lr=inf"], "optim.lr"),
        (["optim.lr=nan"], "optim.lr"),
        ([f"train.seed={HUGE}"], "train.seed"),
        (["data.resolution=12"], "data.resolution"),
    ],
}
BASE = {
    "generate": ["generate", PROMPT, "--export-dir", "{exp}", "--out", "{out}"],
    "generate --backend torch": ["generate", PROMPT, "--backend", "torch", "--out", "{out}"],
    "parity": ["parity", "{exp}", "--json", "{out}"],
    "bench": ["bench", "{exp}", "--json", "{out}"],
    "demo": ["demo", "--out", "{out}"],
    "selftest --dry-run": ["selftest", "--dry-run", "--out", "{out}"],
    "build": ["build", "{exp}", "--out", "{out}"],
    "export": ["export", "--out", "{out}"],
    "serve": ["serve", "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0"],
    "export-triton": ["export-triton", "{exp}", "--out", "{out}"],
    "train": ["train", "--recipe", "tiny-synthetic", "--out", "{out}"],
}


@pytest.mark.parametrize(
    ("command", "extra", "flag"),
    [
        pytest.param(command, extra, flag, id=f"{command} {' '.join(extra)}")
        for command, cases in CASES.items()
        for extra, flag in cases
    ],
)
def test_out_of_range_values_are_refused_by_every_command(
    command: str,
    extra: list[str],
    flag: str,
    tiny_export: Path,
    tmp_path: Path,
    monkeypatch,
    capsys,
) -> None:
    args = [p.format(exp=tiny_export, out=tmp_path / "out") for p in BASE[command]] + extra
    watch = [tmp_path, cache_root() / "exports"]
    refused(args, monkeypatch, capsys, watch, flag)
    assert not (tmp_path / "out").exists()


def test_library_callers_get_the_parameter_names() -> None:
    """The same checks where the library receives the values, naming Python parameters."""
    from maskattn_deploy.bench.gpu_check.plan import CheckConfig
    from maskattn_deploy.bench.run import BenchConfig
    from maskattn_deploy.demo import DemoConfig
    from maskattn_deploy.engine.builder import BuildOptions
    from maskattn_deploy.parity.inputs import ShapeCase
    from maskattn_deploy.parity.run import ParityConfig
    from maskattn_deploy.runtime.pipeline import GenerateConfig

    cases = [
        (lambda: GenerateConfig(PROMPT, steps=0), "steps must be an integer in 1..1000, got 0"),
        (lambda: GenerateConfig(PROMPT, guidance=math.inf), "guidance must be a finite number"),
        (lambda: GenerateConfig(PROMPT, guidance=math.nan), "guidance must be a finite number"),
        (
            lambda: GenerateConfig(PROMPT, seed=10**23),
            "seed must be an integer in 0..18446744073709551615",
        ),
        (lambda: GenerateConfig(PROMPT, height=8192), "height must be an integer in 8..4096"),
        (lambda: GenerateConfig(PROMPT, num_images=0), "num_images must be an integer in 1..64"),
        (lambda: GenerateConfig(PROMPT, steps=True), "steps must be an integer"),
        (lambda: ParityConfig(Path("x"), steps=0), "steps must be an integer in 1..1000"),
        (lambda: ParityConfig(Path("x"), shapes=[ShapeCase(0, 256, 256)]), "shapes 0x256x256"),
        (lambda: BenchConfig(repeats=0), "repeats must be an integer in 1.."),
        (lambda: BenchConfig(threads=-2), "threads must be an integer in 1..1024"),
        (lambda: DemoConfig(steps=0), "steps must be an integer in 1..1000"),
        (lambda: CheckConfig(budget_s=math.nan), "budget_s must be a finite number"),
        (lambda: BuildOptions(opt_level=9), "opt_level must be an integer in 0..5"),
        (lambda: BuildOptions(workspace_gib=math.nan), "workspace_gib must be a finite number"),
    ]
    for make, message in cases:
        with pytest.raises(UserError) as err:
            make()
        assert message in str(err.value), str(err.value)
        assert "--" not in str(err.value)  # Python callers read parameter names, not flags
    with pytest.raises(ValueError):  # the usual exception for a bad argument value
        GenerateConfig(PROMPT, steps=-1)
    assert issubclass(InvalidValueError, ValueError)


def test_running_out_of_memory_is_one_line(monkeypatch, capsys, tmp_path: Path) -> None:
    """What the CPU allocator raises for a size that does not fit (the test does not try one:
    the machine is shared)."""
    from _hostile import assert_one_line_error, run_cli

    from maskattn_deploy.runtime.pipeline import Pipeline

    def too_big(self, *args, **kwargs):
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate "
            "memory: you tried to allocate 68719476736 bytes. Error code 12"
        )

    monkeypatch.setattr(Pipeline, "_run", too_big)
    args = ["generate", PROMPT, "--backend", "torch", "--height", "2048", "--width", "2048"]
    code, err = run_cli([*args, "--out", str(tmp_path / "out")], monkeypatch, capsys)
    assert code == 2
    line = assert_one_line_error(err, "out of memory", "2048x2048", "--height", "--num-images")
    assert "allocate" not in line and not (tmp_path / "out").exists()
