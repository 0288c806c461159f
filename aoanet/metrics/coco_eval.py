"""coco-caption evaluation (the reference's ``eval_utils.language_eval``) with pycocoevalcap.

    from aoanet.metrics.coco_eval import check_java, language_eval, format_table

    check_java()                      # before decoding: fail early when Java is missing
    metrics = language_eval(predictions, references)                 # {"Bleu_1", ..., "CIDEr"[, "SPICE"]}
    metrics, per_image = language_eval(predictions, references, return_per_image=True)
    print(format_table(metrics))

``predictions`` are the COCO results format ``[{"image_id": int, "caption": str}, ...]``; ``references`` maps
an image id to its raw reference captions (the full COCO captions, not the truncated label rows). As in
coco-caption, predictions and references are tokenised with the Stanford PTB tokenizer (lower case,
punctuation dropped), then scored by BLEU-1..4, METEOR 1.5, ROUGE-L and CIDEr (coco-caption's "CIDEr" is
CIDEr-D with the idf of the evaluated references), all on pycocoevalcap's scale (CIDEr 1.283, not 128.3).

SPICE needs the Stanford CoreNLP 3.6.0 jars in pycocoevalcap/spice/lib. ``spice=None`` (auto) computes it when
they are there and otherwise skips it with a one-line notice; ``spice=True`` requires it; ``spice=False``
skips it. Nothing is ever downloaded (pycocoevalcap's ``Spice()`` would download the jars, so it is only
constructed when they are present).
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

METRIC_ORDER = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
SPICE_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")

_notices_shown: set[str] = set()


class JavaNotFoundError(RuntimeError):
    """No usable Java runtime: METEOR, SPICE and the PTB tokenizer cannot run."""


def check_java() -> str:
    """The path of a working ``java``; raises :class:`JavaNotFoundError` otherwise.

    Call it before decoding, so that an evaluation command fails in seconds rather than after the decoding."""
    java = shutil.which("java")
    if java is None:
        raise JavaNotFoundError(
            "Java not found: METEOR and the PTB tokenizer need a Java runtime (java on PATH). Install one "
            "(e.g. `apt-get install default-jre-headless`, any JRE 8+) or evaluate without language metrics.")
    try:
        proc = subprocess.run([java, "-version"], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise JavaNotFoundError(f"Java at {java} does not run ({e}): METEOR and the PTB tokenizer need a "
                                f"working Java runtime") from e
    if proc.returncode != 0:
        code = proc.returncode
        raise JavaNotFoundError(f"Java at {java} does not run (`java -version` exited with {code}): METEOR "
                                f"and the PTB tokenizer need a working Java runtime")
    return java


def spice_status(lib_dir: str | Path | None = None) -> tuple[bool, str]:
    """(whether SPICE can run, why not). Looks for the CoreNLP jars in ``lib_dir`` (default: pycocoevalcap's
    spice/lib); never downloads anything."""
    if lib_dir is None:
        spec = importlib.util.find_spec("pycocoevalcap.spice.spice")  # locate without importing it
        if spec is None or spec.origin is None:
            return False, "SPICE skipped: pycocoevalcap.spice is not installed"
        lib_dir = Path(spec.origin).resolve().parent / "lib"
    lib = Path(lib_dir)
    missing = [name for name in SPICE_JARS if not (lib / name).is_file()]
    if missing:
        return False, (f"SPICE skipped: Stanford CoreNLP 3.6.0 not found ({', '.join(missing)} missing in "
                       f"{lib}; pycocoevalcap's spice/get_stanford_models.py fetches them)")
    return True, ""


def _notice(message: str) -> None:
    """Print a one-line notice to stderr, once per process."""
    if message not in _notices_shown:
        _notices_shown.add(message)
        print(message, file=sys.stderr)


def _validate(predictions: Sequence[Mapping], references: Mapping) -> tuple[list, dict]:
    if isinstance(predictions, Mapping) or not isinstance(predictions, Sequence):
        raise TypeError("predictions must be a list of {'image_id': int, 'caption': str} "
                        "(the COCO results format)")
    seen: dict[int, int] = {}
    for i, p in enumerate(predictions):
        if not isinstance(p, Mapping):
            raise TypeError(f"predictions[{i}] must be a dict with 'image_id' and 'caption', got "
                            f"{type(p).__name__}")
        for field in ("image_id", "caption"):
            if field not in p:
                raise ValueError(f"predictions[{i}] has no field {field!r}")
        if not isinstance(p["caption"], str):
            raise TypeError(f"predictions[{i}]['caption'] must be a str, got {type(p['caption']).__name__}")
        image_id = p["image_id"]
        if image_id in seen:
            raise ValueError(f"image {image_id!r} has two predictions (predictions[{seen[image_id]}] and "
                             f"predictions[{i}]); give one caption per image")
        seen[image_id] = i
        refs = references.get(image_id)
        if refs is None:
            raise ValueError(f"predictions[{i}]: image {image_id!r} has no references (is it in the split "
                             f"the references were loaded for?)")
        if isinstance(refs, str) or not isinstance(refs, Sequence) or len(refs) == 0 \
                or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"references[{image_id!r}] must be a non-empty list of caption strings")
    if not seen:
        raise ValueError("predictions is empty: nothing to evaluate")
    return list(seen), {image_id: list(references[image_id]) for image_id in seen}


def _tokenize(predictions: Sequence[Mapping], references: dict) -> tuple[dict, dict]:
    """PTB-tokenise predictions and references in one Java call (one JVM start instead of two)."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    def clean(text: str) -> str:  # the tokenizer works line by line
        return " ".join(text.split())

    both = {("ref", k): [{"caption": clean(c)} for c in refs] for k, refs in references.items()}
    both.update({("res", p["image_id"]): [{"caption": clean(p["caption"])}] for p in predictions})
    tokens = PTBTokenizer().tokenize(both)
    gts = {k: tokens[("ref", k)] for k in references}
    res = {p["image_id"]: tokens[("res", p["image_id"])] for p in predictions}
    return gts, res


def language_eval(predictions: Sequence[Mapping], references: Mapping[int, Sequence[str]],
                  spice: bool | None = None, return_per_image: bool = False):
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr (and SPICE) of ``predictions`` against ``references``.

    Returns ``{metric: score}`` on pycocoevalcap's scale, or ``(metrics, per_image)`` with
    ``per_image[image_id] = {metric: score}`` when ``return_per_image``. Every predicted image must have
    references (otherwise a ValueError names it); references of images without a prediction are ignored."""
    image_ids, refs = _validate(predictions, references)
    check_java()
    if spice is None or spice:
        available, why_not = spice_status()
        if not available:
            if spice:
                raise RuntimeError(why_not.replace("SPICE skipped",
                                                   "SPICE requested (spice=True) but cannot run"))
            _notice(why_not)
        run_spice = available
    else:
        run_spice = False

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge

    gts, res = _tokenize(predictions, refs)
    metrics: dict[str, float] = {}
    per_image: dict = {k: {} for k in image_ids}

    def record(name: str, score: float, scores) -> None:
        metrics[name] = float(score)
        for k, s in zip(image_ids, scores, strict=True):
            per_image[k][name] = float(s)

    score, scores = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        record(f"Bleu_{n + 1}", score[n], scores[n])
    meteor = Meteor()
    try:
        record("METEOR", *meteor.compute_score(gts, res))
    finally:
        meteor.__del__()  # stop the Java process now, not at garbage collection (a second call is a no-op)
    record("ROUGE_L", *Rouge().compute_score(gts, res))
    record("CIDEr", *Cider().compute_score(gts, res))
    if run_spice:
        from pycocoevalcap.spice.spice import Spice

        try:
            score, scores = Spice().compute_score(gts, res)
        except (OSError, subprocess.CalledProcessError) as e:
            if spice:
                raise RuntimeError(f"SPICE failed: {e}") from e
            _notice(f"SPICE skipped: the SPICE run failed ({e})")
        else:
            record("SPICE", score, [s["All"]["f"] for s in scores])
    return (metrics, per_image) if return_per_image else metrics


def format_table(metrics: Mapping[str, float]) -> str:
    """A two-column text table of the metrics, in coco-caption's order."""
    names = [m for m in METRIC_ORDER if m in metrics] + sorted(m for m in metrics if m not in METRIC_ORDER)
    width = max([len("metric")] + [len(m) for m in names])
    lines = [f"{'metric':{width}s}  score", f"{'-' * width}  ------"]
    lines += [f"{m:{width}s}  {metrics[m]:.4f}" for m in names]
    return "\n".join(lines)
