import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

# Tiny ops slow down badly with several threads on a shared 2-core machine.
torch.set_num_threads(1)
