"""AoANet image captioning in PaddlePaddle (training side): data, model, training, evaluation, conversion.

Importing it changes nothing in the process environment; the commands tune Paddle's math library for the CPU
(``aoanet.cpu``).
"""

__version__ = "0.1.0"
