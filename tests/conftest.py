"""Test-wide settings: the models here are tiny, and one intra-op thread is faster for them on a
loaded 2-core machine than two fighting threads."""

import torch

torch.set_num_threads(1)
