"""Where one UNet step's time goes: ``torch.profiler`` top kernels of an unmasked and a masked
step (device time on CUDA, CPU ops on the dry run), taken before the compiles eat the budget."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from maskattn_deploy.bench.gpu_check.context import RunContext
from maskattn_deploy.bench.gpu_check.results import Profile, ProfileRow, ProfileStep

PROFILED = ("eager_unmasked", "eager_masked_fused")
PROFILE_TOP = 25


def profile_part(
    ctx: RunContext, steps: dict[str, Callable[[], Callable[[], Any]]], kernel_ok: bool | None
) -> Profile:
    """The top kernels of one step of each variant in ``steps`` (name -> a function that builds
    that variant's step); a failure is recorded, not raised."""
    reason = ctx.budget.skip_reason("profile", ctx.plan.estimate_s["profile"])
    if reason is not None or kernel_ok is False:
        return Profile("skipped", reason=reason or ctx.kernel_path)
    result = Profile("ok", top=PROFILE_TOP, variants={})
    assert result.variants is not None
    try:
        for name, build in steps.items():
            result.variants[name] = profile_step(build(), ctx)
            ctx.echo(profile_line(name, result.variants[name]))
    except Exception as exc:  # a profiler problem must not cost the compile variants
        result.status, result.error = "failed", f"{type(exc).__name__}: {exc}"
    ctx.save()
    return result


def profile_step(step: Callable[[], Any], ctx: RunContext) -> ProfileStep:
    """Profile one warm step; kernels by self device time (CPU: ops by self CPU time)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = ctx.device.type == "cuda"
    step()
    ctx.timer.sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
        ctx.timer.sync()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    rows = [
        ProfileRow(e.key[:120], int(e.count), float(getattr(e, key, 0.0)))
        for e in prof.key_averages()
    ]
    rows = sorted((r for r in rows if r.self_us > 0), key=lambda r: -r.self_us)
    return ProfileStep(
        clock="device" if cuda else "cpu",
        total_ms=sum(r.self_us for r in rows) / 1e3,
        calls=sum(r.calls for r in rows),
        kernels=rows[:PROFILE_TOP],
    )


def profile_line(name: str, p: ProfileStep) -> str:
    top = ", ".join(f"{r.name[:40]} {r.self_us / 1e3:.2f} ms" for r in p.kernels[:3])
    return f"  profile {name}: {p.total_ms:.2f} ms {p.clock} time in {p.calls} calls; top: {top}"
