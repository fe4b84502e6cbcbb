"""The step-progress watchdog: silent while steps finish, one line and its exit code on a hang."""

import threading
import time

from nodepert_dist import hang_watchdog


def _watchdog(timeout_s):
    fired = threading.Event()
    codes = []

    def exit_fn(code):
        codes.append(code)
        fired.set()

    return hang_watchdog.StepWatchdog(timeout_s, "process 1/2", exit_fn=exit_fn), fired, codes


def test_fires_once_after_the_timeout_with_one_line(capfd):
    dog, fired, codes = _watchdog(0.2)
    dog.beat(41)
    assert fired.wait(5.0)
    dog.close()
    assert codes == [hang_watchdog.HANG_EXIT_CODE]
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("error: process 1/2: no training step finished in 0.2 s after step 41")


def test_not_armed_before_the_first_beat():
    """Compiling the first step can take longer than any timeout: it must not count."""
    dog, fired, codes = _watchdog(0.1)
    assert not fired.wait(0.6)
    dog.close()
    assert codes == []


def test_silent_while_steps_keep_finishing():
    dog, fired, codes = _watchdog(0.3)
    for step in range(12):  # 0.6 s of steps, each well inside the timeout
        dog.beat(step)
        time.sleep(0.05)
    dog.close()
    assert not fired.is_set() and codes == []


def test_off_at_zero():
    dog = hang_watchdog.StepWatchdog(0, "process 0/1", exit_fn=lambda code: None)
    assert dog._thread is None
    dog.beat(1)
    dog.close()
