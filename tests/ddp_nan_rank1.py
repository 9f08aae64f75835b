"""`finetune train` with a NaN loss on global rank 1 only, from its second step on (tests/test_ddp.py).

Run once per rank by torchrun; the product code is unchanged, this script patches the module's
training step before calling the CLI.
"""

import os

from finetune.cli import main
from finetune.training.module import Classifier

_training_step = Classifier.training_step


def training_step(self, batch, batch_idx):
    loss = _training_step(self, batch, batch_idx)
    if os.environ.get("RANK") == "1" and self.global_step >= 1:
        return loss * float("nan")  # keeps the graph: DDP's all-reduce still runs
    return loss


Classifier.training_step = training_step

if __name__ == "__main__":
    main()
