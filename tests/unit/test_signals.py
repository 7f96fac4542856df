"""PreemptionFlag: which signals request a checkpoint-and-exit, with which exit code."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from megaspan.training.signals import PreemptionFlag

HANDLED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def assert_installed(f: PreemptionFlag) -> None:
    """Checked before any test signals itself: without the handler, SIGINT would raise
    KeyboardInterrupt in pytest and end the whole session instead of failing one test."""
    for sig in HANDLED:
        assert signal.getsignal(sig) == f._handle, f"no PreemptionFlag handler for {sig.name}"


@pytest.fixture
def flag():
    f = PreemptionFlag()
    f.install()
    assert_installed(f)
    yield f
    f.restore()


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 0), (signal.SIGUSR1, 0), (signal.SIGINT, 130)])
def test_signal_sets_the_flag_and_exit_code(flag, sig, code):
    os.kill(os.getpid(), sig)  # delivered to this (main) thread before kill returns
    assert flag.signum == sig and flag.exit_code == code
    assert flag.agreed(torch.device("cpu"))
    assert flag.exit_code == code


def test_no_signal_no_stop(flag):
    assert not flag.agreed(torch.device("cpu")) and flag.exit_code == 0


def test_second_ctrl_c_aborts_at_once(flag):
    os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)


def test_sigterm_after_ctrl_c_keeps_waiting_for_the_checkpoint(flag):
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGTERM)  # e.g. a launcher forwarding; no abort
    assert flag.exit_code == 130


def test_sigint_inherited_as_ignored_is_handled_anyway():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as `cmd &` in a script starts it
    f = PreemptionFlag()
    try:
        f.install()
        assert_installed(f)
        os.kill(os.getpid(), signal.SIGINT)
        assert f.signum == signal.SIGINT
    finally:
        f.restore()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # restore gives back what was there
        signal.signal(signal.SIGINT, previous)


def test_second_ctrl_c_after_the_save_says_so(flag, capsys):
    from megaspan.errors import Interrupted

    os.kill(os.getpid(), signal.SIGINT)
    flag.saved_step = 7
    with pytest.raises(Interrupted):
        os.kill(os.getpid(), signal.SIGINT)
    err = capsys.readouterr().err
    assert "checkpoint of step 7 is saved" in err and "without a checkpoint" not in err


def test_finish_ignores_sigterm_and_sigusr1():
    """After the run, a scheduler's SIGTERM must not turn the decided exit code into -15."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    f = PreemptionFlag()
    try:
        f.install()
        f.finish()
        os.kill(os.getpid(), signal.SIGTERM)  # default action would kill this test process
        os.kill(os.getpid(), signal.SIGUSR1)
        assert f.signum is None
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def test_ctrl_c_reaching_main_exits_130_without_traceback(monkeypatch, capsys):
    from megaspan.cli import info, main

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(info, "run", interrupted)
    assert main(["info"]) == 130
    assert capsys.readouterr().err.strip() == "megaspan: interrupted"
