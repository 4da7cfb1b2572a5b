"""Run main.py with one injected fault, for tests/test_reliability.py.

    python tests/fault_runner.py kill_in_save N  <main.py options>   # SIGKILL half-way through the N-th checkpoint write
    python tests/fault_runner.py kill_in_step N  <main.py options>   # SIGKILL before the N-th optimizer step
    torchrun ... tests/fault_runner.py nan_in_rank_1 N <main.py options>  # a NaN loss at process 1's N-th step
"""
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import main as entry  # noqa: E402
from utils import trainer_class  # noqa: E402
from utils.training import checkpoint  # noqa: E402

kind, target, options = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
count = 0


def die_now():
    os.kill(os.getpid(), signal.SIGKILL)


if kind == "kill_in_save":
    real_save = torch.save

    def half_save(obj, file, *args, **kwargs):
        global count
        count += 1
        if count == target:
            file.write(b"the first bytes of a checkpoint")
            file.flush()
            die_now()
        return real_save(obj, file, *args, **kwargs)

    checkpoint.torch.save = half_save
elif kind == "kill_in_step":
    real_step = trainer_class.Trainer.backward_pass

    def dying_step(self, loss):
        global count
        count += 1
        if count == target:
            die_now()
        return real_step(self, loss)

    trainer_class.Trainer.backward_pass = dying_step
elif kind == "nan_in_rank_1":
    real_forward = trainer_class.Trainer.forward_pass

    def nan_in_one_process(self, batch):
        global count
        loss, logits = real_forward(self, batch)
        count += 1
        return (loss * float("nan") if self.place.rank == 1 and count == target else loss), logits

    trainer_class.Trainer.forward_pass = nan_in_one_process
else:
    sys.exit(f"unknown fault {kind}")

sys.exit(entry.main(options))
