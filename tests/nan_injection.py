"""Run the `dcq` command with the loss of step N poisoned to NaN (a fault the tests inject from
outside the package): ``python tests/nan_injection.py N dcq-arguments...``."""

import sys

from dcq.train.step import TrainStep


def poison_step(step: int) -> None:
    """From now on, the `step`-th call of any TrainStep in this process sees a NaN loss."""
    original = TrainStep.__call__
    calls = 0

    def poisoned(self, *args, loss_check=None, **kwargs):
        nonlocal calls
        calls += 1
        if calls == step and loss_check is not None:
            check = loss_check
            loss_check = lambda loss: check(loss * float("nan"))  # noqa: E731
        return original(self, *args, loss_check=loss_check, **kwargs)

    TrainStep.__call__ = poisoned


if __name__ == "__main__":
    from dcq.cli import main

    poison_step(int(sys.argv[1]))
    sys.exit(main(sys.argv[2:]))
