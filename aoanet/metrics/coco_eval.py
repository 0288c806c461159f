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

The PTB tokenizer and METEOR run pycocoevalcap's jars through this module's own small drivers (the same command
lines and protocol): their Java processes end with this process however it ends (``aoanet.procs``), and a Ctrl-C
while METEOR scores stops it at once (pycocoevalcap's ``Meteor`` keeps a lock taken when it is interrupted, and its
clean-up then waits on that lock forever).

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
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from aoanet import procs

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


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)  # locate without importing it
    if spec is None or spec.origin is None:
        raise RuntimeError(f"{module} is not installed: pip install pycocoevalcap")
    return Path(spec.origin).resolve().parent


class JavaToolError(RuntimeError):
    """The tokenizer or METEOR (Java) failed."""


def _stderr_tail(f) -> str:
    f.seek(0)
    text = f.read().decode("utf-8", "replace").strip().splitlines()
    return (": " + " | ".join(text[-3:])) if text else ""


def ptb_tokenize(sentences: list[str]) -> list[str]:
    """coco-caption's tokenisation: Stanford's PTBTokenizer (pycocoevalcap's jar, one sentence per line, lower
    case), then its punctuation tokens dropped."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS, STANFORD_CORENLP_3_4_1_JAR

    jar = _package_dir("pycocoevalcap.tokenizer.ptbtokenizer") / STANFORD_CORENLP_3_4_1_JAR
    punctuation = set(PUNCTUATIONS)
    with tempfile.TemporaryDirectory(prefix="aoanet-ptb-") as tmp:
        text = Path(tmp) / "captions.txt"
        text.write_bytes("\n".join(sentences).encode())
        cmd = ["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase",
               str(text)]
        with tempfile.TemporaryFile() as err:
            process = procs.popen(cmd, cwd=tmp, stdout=subprocess.PIPE, stderr=err)
            try:
                out = process.communicate()[0]
            finally:
                procs.stop(process)
            if process.returncode != 0:
                raise JavaToolError(f"the PTB tokenizer (java) exited with status {process.returncode}"
                                    f"{_stderr_tail(err)}")
    lines = out.decode().split("\n")
    return [" ".join(w for w in line.rstrip().split(" ") if w not in punctuation) for line in lines[: len(sentences)]]


class Meteor:
    """METEOR 1.5 (pycocoevalcap's jar, its command line and its stdio protocol) in a Java process of our own;
    ``close()`` (or the context manager) ends it."""

    JAR = "meteor-1.5.jar"

    def __init__(self):
        cmd = ["java", "-jar", "-Xmx2G", self.JAR, "-", "-", "-stdio", "-l", "en", "-norm"]
        self._err = tempfile.TemporaryFile()
        self.process = procs.popen(cmd, cwd=_package_dir("pycocoevalcap.meteor.meteor"), stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=self._err)

    def _ask(self, line: str) -> str:
        try:
            self.process.stdin.write(line.encode() + b"\n")
            self.process.stdin.flush()
            reply = self.process.stdout.readline()
        except BrokenPipeError:
            reply = b""
        if not reply:
            status = self.process.poll()
            raise JavaToolError(f"METEOR (java) stopped{'' if status is None else f' with status {status}'}"
                                f"{_stderr_tail(self._err)}")
        return reply.decode().strip()

    def _read(self) -> float:
        reply = self.process.stdout.readline()
        if not reply:
            raise JavaToolError(f"METEOR (java) stopped{_stderr_tail(self._err)}")
        return float(reply.strip())

    def compute_score(self, gts: dict, res: dict) -> tuple[float, list[float]]:
        """(corpus METEOR, per-image scores) of one tokenised hypothesis per image against its references."""
        ids = list(gts)
        stats = []
        for i in ids:
            hypothesis = res[i][0].replace("|||", "").replace("  ", " ")
            stats.append(self._ask(" ||| ".join(("SCORE", " ||| ".join(gts[i]), hypothesis))))
        first = self._ask(" ||| ".join(("EVAL", *stats)))
        scores = [float(first)] + [self._read() for _ in ids[1:]]
        return self._read(), scores

    def close(self) -> None:
        procs.stop(self.process)
        self._err.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _tokenize(predictions: Sequence[Mapping], references: dict) -> tuple[dict, dict]:
    """PTB-tokenise predictions and references in one Java call (one JVM start instead of two)."""

    def clean(text: str) -> str:  # the tokenizer works line by line
        return " ".join(text.split())

    keys = [("ref", k) for k, refs in references.items() for _ in refs]
    keys += [("res", p["image_id"]) for p in predictions]
    sentences = [clean(c) for refs in references.values() for c in refs] + [clean(p["caption"]) for p in predictions]
    tokens: dict = {}
    for key, line in zip(keys, ptb_tokenize(sentences), strict=True):
        tokens.setdefault(key, []).append(line)
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
    with Meteor() as meteor:
        record("METEOR", *meteor.compute_score(gts, res))
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
