"""AoANet image captioning in PaddlePaddle (training side).

Importing this package sets ``MKL_DEBUG_CPU_TYPE=5`` unless the user set it: Paddle's bundled MKL otherwise takes a
matmul code path ~3x slower on AMD CPUs. It must be set before Paddle is first imported.
"""

import os

os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")

__version__ = "0.1.0"
