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
    def __init__(
        self,
        checkpoint: Path | None = None,
        which: str = "best",
        threads: int | None = None,
        extractor: Path | None = None,
    ):
        if checkpoint is None:
            raise BackendError("--backend paddle needs --checkpoint CHECKPOINT_DIR")
        configure_math_library()  # a command's process: tune Paddle's math library before it is loaded
        warnings.filterwarnings("ignore", message="No ccache found", category=UserWarning)  # (custom operators only)
        import paddle

        from aoanet.train.checkpoint import CheckpointError, load_model, read_model_json

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
        self.has_attention = True  # AoAModel.decode(return_attention=True)
        self.checkpoint, self.threads = Path(checkpoint), threads
        self.extractor_record = read_model_json(checkpoint).get("extractor")
        self.extractor_dir = extractor

    def image_extractor(self):
        """The extractor the checkpoint's features came from (recorded in its model.json, checked by sha256), or
        ``extractor`` when given; run in onnxruntime, as the features the model was trained on were made."""
        from aoanet.vision.extract import extractor_hashes
        from aoanet_runtime.extractor import Extractor, ExtractorError

        record = self.extractor_record
        if self.extractor_dir is None and record is None:
            raise BackendError(
                f"{self.checkpoint} was not trained on features of an image extractor (no 'extractor' in its "
                f"model.json): it reads region features of width {self.width}; give --features, or --extractor DIR"
            )
        directory = Path(self.extractor_dir if self.extractor_dir is not None else record["dir"])
        try:
            if record is not None and extractor_hashes(directory) != record.get("sha256"):
                raise BackendError(
                    f"{directory} is not the extractor {self.checkpoint} was trained with (sha256 differ)"
                )
            extractor = Extractor.from_dir(directory, threads=self.threads)
        except (OSError, ExtractorError) as e:
            raise BackendError(f"cannot load the image extractor: {e}") from None
        if extractor.spec.feature_width != self.width:
            raise BackendError(f"{directory}: {extractor.spec.feature_width}-d features, the model reads {self.width}")
        return extractor

    def decode(self, att_feats, att_masks, beam_size, max_length, **options):
        t = self.paddle.to_tensor
        return self.model.decode(t(att_feats), t(att_masks), beam_size=beam_size, max_length=max_length, **options)
