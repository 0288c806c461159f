"""The Paddle backend of ``aoanet-infer``: a checkpoint's model in Paddle's dynamic graph, decoding through
``AoAModel.decode`` (the runtime's search). Registered as the entry point ``paddle`` of ``aoanet_runtime.backends``,
so that the runtime can offer it without naming this package."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from aoanet.cpu import configure_math_library
from aoanet_runtime.backends import BackendError
from aoanet_runtime.features import MemoryModel


class PaddleBackend:
    def __init__(self, checkpoint: Path | None = None, which: str = "best", threads: int | None = None):
        if checkpoint is None:
            raise BackendError("--backend paddle needs --checkpoint CHECKPOINT_DIR")
        configure_math_library()  # a command's process: tune Paddle's math library before it is loaded
        warnings.filterwarnings("ignore", message="No ccache found", category=UserWarning)  # (custom operators only)
        import paddle

        from aoanet.train.checkpoint import CheckpointError, load_model

        self.paddle = paddle
        try:
            paddle.base.core.set_num_threads(int(threads or os.cpu_count() or 1))
        except AttributeError:  # an older Paddle
            pass
        try:
            self.model, self.ix_to_word = load_model(checkpoint, which)
        except (CheckpointError, ValueError, OSError) as e:
            raise BackendError(f"cannot load the checkpoint: {e}") from None
        o = self.model.options
        self.width = o.att_feat_size
        self.memory_model = MemoryModel(o.att_feat_size, o.rnn_size, o.num_heads)
        self.streams = 1

    def decode(self, att_feats, att_masks, beam_size, max_length, **options):
        t = self.paddle.to_tensor
        return self.model.decode(t(att_feats), t(att_masks), beam_size=beam_size, max_length=max_length, **options)
