"""The battery: every check in order with its prerequisites, and how a subject is run through it."""

from __future__ import annotations

from collections.abc import Sequence

from gia_bench.contract.base import Check, CheckResult, NotApplicable, Subject
from gia_bench.contract.checks import (
    check_awkward,
    check_bytes,
    check_decode,
    check_decode_fresh,
    check_deterministic,
    check_documented,
    check_empty,
    check_inputs_untouched,
    check_no_alias,
    check_shapes,
    check_spec,
    check_zeros,
)
from gia_bench.contract.gloo import check_gloo
from gia_bench.contract.state import check_cuda, check_error_feedback, check_public_state, check_resume, check_simulate
from gia_bench.errors import GiaBenchError

#: The battery, in the order it runs. The gloo check runs last and only when every other passed.
CHECKS: tuple[Check, ...] = (
    Check("shapes, dtypes and finite values", check_shapes),
    Check("spec string round-trips", check_spec, ("shapes, dtypes and finite values",)),
    Check("documented", check_documented),
    Check("bytes are the recorded message tensors", check_bytes, ("shapes, dtypes and finite values",)),
    Check("all-zero gradients", check_zeros, ("shapes, dtypes and finite values",)),
    Check("awkward tensors", check_awkward, ("shapes, dtypes and finite values",)),
    Check("empty gradient list", check_empty),
    Check("deterministic", check_deterministic, ("shapes, dtypes and finite values",)),
    Check("inputs untouched", check_inputs_untouched, ("shapes, dtypes and finite values",)),
    Check("output does not alias the input", check_no_alias, ("shapes, dtypes and finite values",)),
    Check("output is what the messages carry", check_decode, ("shapes, dtypes and finite values",)),
    Check(
        "decode needs only the messages",
        check_decode_fresh,
        ("spec string round-trips", "output is what the messages carry"),
    ),
    Check("public state is known to the receiver", check_public_state, ("deterministic",)),
    Check("simulate matches message_values", check_simulate, ("shapes, dtypes and finite values",)),
    Check("state_dict resumes bit-identically", check_resume, ("deterministic",)),
    Check("error feedback loses nothing", check_error_feedback, ("shapes, dtypes and finite values",)),
    Check("CUDA gradients stay on the device", check_cuda, ("shapes, dtypes and finite values",)),
)
GLOO_CHECK = Check("two gloo workers agree", check_gloo, multiprocess=True)
CHECK_NAMES: tuple[str, ...] = tuple(c.name for c in CHECKS) + (GLOO_CHECK.name,)


def run_check(check: Check, subject: Subject) -> CheckResult:
    """One check; a plug-in's exception is its failure (with the exception as the reason)."""
    from gia_bench.remote import WorkerGone

    try:
        reason = check.run(subject)
    except NotApplicable as exc:
        return CheckResult(check.name, True, str(exc), skipped=True)
    except WorkerGone as exc:  # the plug-in's worker died or hung: the reason says which
        reason = str(exc)
    except GiaBenchError as exc:
        reason = str(exc) or type(exc).__name__
    except Exception as exc:  # a third-party compressor may fail in any way; the battery reports it
        # remote_type: the exception's type in the worker (gia_bench.remote.RemoteError)
        reason = f"raised {getattr(exc, 'remote_type', type(exc).__name__)}: {exc}"
    return CheckResult(check.name, not reason, reason)


def check_compressor(subject: Subject | str, multiprocess: bool = True) -> list[CheckResult]:
    """Run the battery on ``subject`` (a :class:`Subject` or a spec string); one result per check.

    A check whose prerequisite failed is skipped (``passed=False, skipped=True``) so that
    only the root cause carries a reason; the gloo check (``multiprocess``) runs only when
    every other check passed. Once a remote subject's worker is gone (it died or hung),
    the checks after the one that saw it go are skipped.
    """
    own = isinstance(subject, str)
    if own:
        subject = Subject.from_spec(subject)
    try:
        results: dict[str, CheckResult] = {}
        for check in (*CHECKS, GLOO_CHECK) if multiprocess else CHECKS:
            gone = subject.remote.gone if subject.remote is not None else None
            failed = [n for n in check.needs if n in results and not results[n].passed]
            if check is GLOO_CHECK and not all(r.passed for r in results.values()):
                results[check.name] = CheckResult(check.name, False, "not run: other checks failed", skipped=True)
            elif gone is not None:
                results[check.name] = CheckResult(check.name, False, "not run: the plug-in's worker is gone", skipped=True)
            elif failed:
                results[check.name] = CheckResult(check.name, False, f"not run: {failed[0]!r} failed", skipped=True)
            else:
                results[check.name] = run_check(check, subject)
        return list(results.values())
    finally:
        if own:
            subject.close()


def failures(results: Sequence[CheckResult]) -> list[CheckResult]:
    """The checks that failed for a reason of their own (not skipped because another failed)."""
    return [r for r in results if not r.passed and not r.skipped]
