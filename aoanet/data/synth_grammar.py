"""Captions for a synthetic scene, written the way five different annotators might.

Each caption is drawn independently from a small grammar: several sentence templates, optional details
(colour, size, a verb, the setting, the second and third object), synonyms for nouns, sizes, counts and
relations, and both word orders of a relation ("a dog to the left of a car" / "a car to the right of a dog").
So the references of one image agree on what is there but differ in how it is said, like human references; the
n-grams they share (object + colour, the relation, the setting phrase) are what CIDEr rewards.
"""

from __future__ import annotations

import numpy as np

from aoanet.data.synth_world import CLASSES, SETTINGS, Group, Scene

SIZE_WORDS = {True: ("large", "big", "huge"), False: ("small", "little", "tiny")}
COUNT_WORDS = {  # determiner phrases by count, with probabilities
    1: (("a", 0.8), ("the", 0.12), ("one", 0.08)),
    2: (("two", 0.8), ("a pair of", 0.1), ("some", 0.1)),
    3: (("three", 0.8), ("several", 0.1), ("a group of", 0.1)),
}
RELATION_WORDS = {  # how "group 0 is <relation> of group 1" is said
    "left": (("to the left of", 0.45), ("left of", 0.1), ("next to", 0.25), ("beside", 0.1), ("near", 0.1)),
    "right": (
        ("to the right of", 0.45),
        ("right of", 0.1),
        ("next to", 0.25),
        ("beside", 0.1),
        ("near", 0.1),
    ),
    "above": (("above", 0.6), ("over", 0.25), ("on top of", 0.15)),
    "below": (("below", 0.5), ("under", 0.3), ("beneath", 0.2)),
}
INVERSE = {"left": "right", "right": "left", "above": "below", "below": "above"}
VERBS = {
    "animal": ("standing", "sitting", "lying", "walking"),
    "person": ("standing", "sitting", "walking"),
    "vehicle": ("parked",),
    "thing": (),
}
PHOTO = ("a photo of", "a picture of", "an image of", "a view of")


def _pick(rng: np.random.Generator, weighted) -> str:
    words, p = zip(*weighted, strict=True)
    return words[int(rng.choice(len(words), p=np.asarray(p) / sum(p)))]


def noun_phrase(rng: np.random.Generator, g: Group) -> list[str]:
    cls = CLASSES[g.cls]
    singular, plural = cls.name, cls.plural
    if cls.synonyms and rng.random() < 0.25:
        singular, plural = cls.synonyms[int(rng.integers(len(cls.synonyms)))]
    words = _pick(rng, COUNT_WORDS[g.count]).split()
    if rng.random() < 0.3:
        words.append(str(rng.choice(SIZE_WORDS[g.large])))
    if cls.kind != "person" and rng.random() < 0.75:
        words.append(g.colour)
    words.append(singular if g.count == 1 else plural)
    if cls.kind == "person" and rng.random() < 0.7:  # people wear their colour
        shirt = "shirt" if g.count == 1 else "shirts"
        form = int(rng.integers(3))
        words += (
            (["in", "a", g.colour, shirt] if g.count == 1 else ["in", g.colour, shirt])
            if form == 0
            else ["wearing", g.colour]
            if form == 1
            else ["in", g.colour]
        )
    return words


def verb_phrase(rng: np.random.Generator, g: Group) -> list[str]:
    verbs = VERBS[CLASSES[g.cls].kind]
    if not verbs or rng.random() > 0.35:
        return []
    aux = [] if rng.random() < 0.6 else (["is"] if g.count == 1 else ["are"])
    return aux + [str(rng.choice(verbs))]


def _setting(rng: np.random.Generator, scene: Scene, p: float) -> list[str]:
    return str(rng.choice(SETTINGS[scene.setting])).split() if rng.random() < p else []


def _fix_articles(words: list[str]) -> list[str]:
    """ "a" before a vowel sound becomes "an" (the word after "a" can change with the optional adjectives)."""
    return [
        ("an" if w == "a" and i + 1 < len(words) and words[i + 1][0] in "aeiou" else w) for i, w in enumerate(words)
    ]


def caption(rng: np.random.Generator, scene: Scene) -> list[str]:
    """One caption as a list of lower-case tokens."""
    groups = scene.groups
    a = groups[0]
    if len(groups) == 1 or rng.random() < 0.1:  # some annotators mention only the main object
        form = _pick(rng, (("plain", 0.55), ("there", 0.2), ("photo", 0.25)))
        np_a = noun_phrase(rng, a)
        if form == "plain":
            words = np_a + verb_phrase(rng, a) + _setting(rng, scene, 0.7)
        elif form == "there":
            words = ["there", "is" if a.count == 1 else "are"] + np_a + _setting(rng, scene, 0.7)
        else:
            words = str(rng.choice(PHOTO)).split() + np_a + _setting(rng, scene, 0.6)
        return _fix_articles(words)
    b = groups[1]
    rel = scene.relation(0, 1)
    form = _pick(rng, (("ab", 0.45), ("ba", 0.17), ("there", 0.12), ("photo", 0.12), ("and", 0.14)))
    first, second, r = (b, a, INVERSE[rel]) if form == "ba" else (a, b, rel)
    np1, np2 = noun_phrase(rng, first), noun_phrase(rng, second)
    rel_words = _pick(rng, RELATION_WORDS[r]).split()
    if form in ("ab", "ba"):
        words = np1 + verb_phrase(rng, first) + rel_words + np2
    elif form == "there":
        words = ["there", "is" if first.count == 1 else "are"] + np1 + rel_words + np2
    elif form == "photo":
        words = str(rng.choice(PHOTO)).split() + np1 + rel_words + np2
    else:
        words = np1 + ["and"] + np2
    if len(groups) > 2 and rng.random() < 0.4:
        words += ["and"] + noun_phrase(rng, groups[2])
    return _fix_articles(words + _setting(rng, scene, 0.45))


def raw_sentence(tokens: list[str]) -> str:
    """The "raw" field: what an annotator would have typed."""
    text = " ".join(tokens)
    return text[0].upper() + text[1:] + "."
