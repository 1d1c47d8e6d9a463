"""Conversations about shapes-VQA scenes, the training text of ``pyrtok train-vlm``.

A training sample is one scene (:func:`~pyrtok.data.shapes_vqa.make_scene`) and one or more questions about
it. The first question of scene ``i`` is exactly the one the benchmark split asks, so single-turn training
sees the evaluation prompt; further turns (:func:`scene_questions`) come from fresh draws of the same
question generator, cycling through the families, so one encoded image supervises several answers.
:func:`conversation` writes the turns as LLaVA-style text and :func:`answer_labels` marks which of its
tokens are answers (the only tokens the language model is trained to predict).

Everything here is a pure function of (seed, split, index): the batches of a resumed run are the ones an
uninterrupted run would have drawn.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pyrtok.data.shapes_vqa import ANSWERS, FAMILIES, SPLITS, make_scene, patch_targets, questions_for, scene_labels
from pyrtok.images import image_tensor

__all__ = [
    "OPEN_WORDS", "PROMPT", "SHORT_ANSWER", "STOCK_PROMPTS", "WORDING", "answer_labels", "conversation",
    "family_counts", "num_turns", "open_question", "pope_question", "reword", "scene_batch", "scene_questions",
    "vocabulary",
]

PROMPT = "USER: <image> {question} ASSISTANT:"
"""The single-question prompt: evaluation asks exactly this, and it is the first turn of every conversation."""

_DRAW_STRIDE = 100_003  # seed offset between the question draws of one scene
_WORDING_STREAM = 7_001  # seed-sequence entry that separates the wording draws from the scene's own

SHORT_ANSWER = "Answer the question using a single word or phrase."
"""LLaVA-1.5's short-answer suffix, the ``post_prompt`` of stock lmms-eval tasks (POPE, GQA, VQAv2, ...)."""

STOCK_PROMPTS = (SHORT_ANSWER, "Is there a red circle in the image?")
"""Stock lmms-eval prompt text (the short-answer suffix, POPE's question form) whose words the tokenizer of a
``stock_prompts`` vocabulary covers."""

WORDING: dict[str, float] = {"suffix": 0.0, "pope": 0.0, "unknown": 0.0, "open": 0.0}
"""Probabilities of the wording variants of one training turn (:func:`reword`): the short-answer suffix, POPE's
"in the image" form of an existence question, a few unknown words (``<unk>``) after the question, and the open
form of a spatial question (:func:`open_question`), answered with a direction word instead of yes / no."""

_RELATION = re.compile(r"is the (?P<a>.+) (?P<relation>left of|above) the (?P<b>.+)\?")
_SIDE = re.compile(r"is the (?P<thing>.+) on the (?P<side>left|right) side\?")
_OPPOSITE = {"left": "right", "right": "left", "above": "below"}

OPEN_WORDS = ("left", "right", "above", "below", "or")
"""The direction words and the "or" of :func:`open_question`'s forms (their other words are the benchmark's own);
the vocabulary of a recipe that asks open forms covers them."""


def _words(text: str) -> set[str]:
    return set(re.findall(r"\w+|[^\w\s]", text.lower()))


def vocabulary(scenes: int = 400, stock_prompts: bool = False, wording: Mapping[str, float] | None = None) -> list[str]:
    """Every word the prompts and answers of the benchmark use (deterministic, sorted); with ``stock_prompts``
    also the words of :data:`STOCK_PROMPTS`, so that stock lmms-eval prompts carry no unknown word, and with a
    ``wording`` that asks open forms (``open`` > 0) also :data:`OPEN_WORDS`."""
    words = {"user", "assistant", ":", "?"} | set(ANSWERS)
    if wording is not None and wording.get("open", 0.0) > 0:
        words.update(OPEN_WORDS)
    for index in range(scenes):
        scene = make_scene(0, "train", index, size=32)
        for item in questions_for(scene, 0, "train", index):
            words.update(_words(item["question"]))
    if stock_prompts:
        for text in STOCK_PROMPTS:
            words.update(_words(text))
    return sorted(words)


def pope_question(question: str) -> str:
    """POPE's form of an existence question: ``is there a red circle?`` -> ``is there a red circle in the image?``.

    Example:
        >>> pope_question("is there an orange square?")
        'is there an orange square in the image?'
    """
    if not question.startswith("is there ") or not question.endswith("?"):
        raise ValueError(f"question must be an existence question 'is there ...?', got {question!r}")
    return question[:-1] + " in the image?"


def open_question(question: str, answer: str) -> tuple[str, str]:
    """The open form of a yes / no spatial question and its answer: the direction word the yes / no implies.

    ``is the A left of the B?`` becomes ``is the A left or right of the B?`` (``left`` / ``right``), ``is the A
    above the B?`` becomes ``is the A above or below the B?`` (``above`` / ``below``), and ``is the X on the
    left side?`` (or right) becomes ``is the X on the left or right side?``. A relation asks the axis on which
    the two objects lie further apart (:func:`~pyrtok.data.shapes_vqa.questions_for`), so "no" to "left of" means
    right of, and "no" to "above" means below.

    Example:
        >>> open_question("is the red circle above the big square?", "no")
        ('is the red circle above or below the big square?', 'below')
    """
    if answer not in ("yes", "no"):
        raise ValueError(f"answer must be 'yes' or 'no', got {answer!r}")
    relation, side = _RELATION.fullmatch(question), _SIDE.fullmatch(question)
    if relation is not None:
        word = relation["relation"].split()[0]
        of = " of" if word == "left" else ""
        text = f"is the {relation['a']} {word} or {_OPPOSITE[word]}{of} the {relation['b']}?"
    elif side is not None:
        word = side["side"]
        text = f"is the {side['thing']} on the left or right side?"
    else:
        raise ValueError(f"question must be a spatial yes / no question (a relation or a side), got {question!r}")
    return text, word if answer == "yes" else _OPPOSITE[word]


def reword(item: dict, rng: np.random.Generator, wording: Mapping[str, float]) -> dict[str, str]:
    """The words one training turn asks ``item``'s question with, and their answer: ``{"text", "answer"}``.

    Independent draws, with the probabilities of ``wording`` (keys of :data:`WORDING`): an existence question in
    POPE's form (:func:`pope_question`), one to three unknown words (``<unk>``) after the question (so that words
    the tokenizer never saw do not derail the answer), the short-answer suffix :data:`SHORT_ANSWER` on a new line,
    as LLaVA-1.5 and lmms-eval write it, and (drawn only where ``open`` > 0, so that recipes without it draw what
    they always drew) a spatial question in its open form (:func:`open_question`), which also changes the answer.
    Every draw is made whatever the item, so the variants of later turns do not depend on earlier ones.

    Example:
        >>> item = {"question": "is there a red circle?", "answer": "yes", "family": "existence"}
        >>> reword(item, np.random.default_rng(0), {"suffix": 1.0, "pope": 1.0, "unknown": 0.0})["text"]
        'is there a red circle in the image?\\nAnswer the question using a single word or phrase.'
    """
    unknown = set(wording) - set(WORDING)
    if unknown:
        raise ValueError(f"wording names unknown variants {sorted(unknown)}; expected some of {list(WORDING)}")
    p = {**WORDING, **wording}
    pope, noise, suffix = rng.random(3) < np.array([p["pope"], p["unknown"], p["suffix"]])
    count = int(rng.integers(1, 4))
    opened = p["open"] > 0 and rng.random() < p["open"]
    text, answer = item["question"], item["answer"]
    if opened and item["family"] == "spatial":
        text, answer = open_question(text, answer)
    if pope and item["family"] == "existence":
        text = pope_question(text)
    if noise:
        text += " " + " ".join(["<unk>"] * count)
    return {"text": text + f"\n{SHORT_ANSWER}" if suffix else text, "answer": answer}


def _reword_turns(turns: list[dict], rng: np.random.Generator, wording: Mapping[str, float]) -> list[dict]:
    """The turns of one conversation with their training words (:func:`reword`), each open form asked once."""
    out, opened = [], set()
    for turn in turns:
        worded = reword(turn, rng, wording)
        if worded["answer"] != turn["answer"]:
            text = open_question(turn["question"], turn["answer"])[0]
            if text in opened:
                worded = {"text": worded["text"].replace(text, turn["question"], 1), "answer": turn["answer"]}
            opened.add(text)
        out.append({**turn, **worded})
    return out


def family_counts(turns: Mapping[str, int]) -> dict[str, int]:
    """``{family: questions per image}`` for every family, from a partial mapping (missing ones ask once)."""
    unknown = set(turns) - set(FAMILIES)
    if unknown:
        raise ValueError(f"turns names unknown families {sorted(unknown)}; expected some of {list(FAMILIES)}")
    counts = {family: turns.get(family, 1) for family in FAMILIES}
    bad = {f: n for f, n in counts.items() if not isinstance(n, int) or isinstance(n, bool) or n < 1}
    if bad:
        raise ValueError(f"turns must ask every family an integer >= 1 times, got {bad}")
    return counts


def num_turns(turns: int | Mapping[str, int]) -> int:
    """Questions per image that ``turns`` (a count or a per-family mapping) asks for."""
    return sum(family_counts(turns).values()) if isinstance(turns, Mapping) else turns


def _distinct_questions(
    scene: Any, seed: int, split: str, index: int, order: list[int], draws: int
) -> Iterator[dict]:
    """The questions of ``draws`` successive draws of the generator about one scene, families in ``order``
    within each draw, each question text once."""
    asked: set[str] = set()
    for draw in range(draws):
        questions = questions_for(scene, seed + draw * _DRAW_STRIDE, split, index)
        for k in order:
            if questions[k]["question"] not in asked:
                asked.add(questions[k]["question"])
                yield questions[k]


def scene_questions(
    scene: Any, seed: int, split: str, index: int, turns: int | Mapping[str, int]
) -> list[dict]:
    """Up to ``turns`` distinct questions about scene ``index``, families cycling from ``index % 5``.

    The first five are the benchmark's own (:func:`~pyrtok.data.shapes_vqa.questions_for`), so the first is
    exactly the question the split asks; further ones come from fresh draws of the same generator (other
    objects, pairs, absent things), skipping any question already asked. ``turns`` may instead map each
    family to how many of its questions to ask (every family at least once, missing ones once): the
    conversation then goes round the families in the same order, each until its count is reached. A scene
    with little to ask about (one object) may yield fewer questions than asked for.
    """
    order = [(index + k) % len(FAMILIES) for k in range(len(FAMILIES))]
    if isinstance(turns, Mapping):
        counts = family_counts(turns)
        pools: dict[str, list[dict]] = {family: [] for family in FAMILIES}
        for question in _distinct_questions(scene, seed, split, index, order, 4 * max(counts.values())):
            pool = pools[question["family"]]
            if len(pool) < counts[question["family"]]:
                pool.append(question)
            if all(len(pools[f]) == n for f, n in counts.items()):
                break
        rounds = max(counts.values())
        return [pools[FAMILIES[k]][r] for r in range(rounds) for k in order if r < len(pools[FAMILIES[k]])]
    out: list[dict] = []
    for question in _distinct_questions(scene, seed, split, index, order, 4 * math.ceil(turns / len(FAMILIES))):
        out.append(question)
        if len(out) == turns:
            break
    return out


def scene_batch(
    split: str,
    first: int,
    count: int,
    size: int,
    seed: int = 0,
    patch: int | None = None,
    turns: int | Mapping[str, int] = 1,
    wording: Mapping[str, float] | None = None,
) -> tuple[Tensor, list[dict]] | tuple[Tensor, list[dict], dict[str, Tensor]]:
    """Scenes ``first .. first+count-1`` of ``split``: images (count, 3, S, S) in [0, 1] and one question each.

    The question family cycles with the scene index, so every family is equally represented. With
    ``turns`` > 1, each question also carries ``"more"``: the scene's next ``turns - 1`` questions (the
    following families, cyclically; see :func:`scene_questions` for more than one per family, or for a
    ``{family: count}`` mapping), for multi-turn training. With ``patch``, also the per-patch targets of
    every scene, ``{name: (count, S/patch, S/patch) int64}``
    (:func:`~pyrtok.data.shapes_vqa.patch_targets`), and under ``"scene"`` its image-level labels, (count, K)
    float32 multi-hot (:func:`~pyrtok.data.shapes_vqa.scene_labels`). With ``wording`` (probabilities of the
    variants of :func:`reword`), every turn also carries ``"text"``: the words it is asked with in training,
    drawn from (seed, split, index) alone, and ``"answer"`` is the answer to those words (a direction word for a
    spatial question asked in its open form); ``"question"`` stays the benchmark's. An open form already asked
    in the conversation (the two side questions of one object share it) is asked in its yes / no form instead,
    so that no answer can be copied from an earlier turn.
    """
    many = num_turns(turns)
    if many < 1:
        raise ValueError(f"turns must be >= 1, got {turns}")
    images, items, targets = [], [], defaultdict(list)
    for index in range(first, first + count):
        scene = make_scene(seed, split, index, size)
        first_question, *more = scene_questions(scene, seed, split, index, turns)
        if wording is not None:
            rng = np.random.default_rng(np.random.SeedSequence([seed, SPLITS[split], index, _WORDING_STREAM]))
            first_question, *more = _reword_turns([first_question, *more], rng, wording)
        item = {**first_question, **({"more": more} if many > 1 else {})}
        images.append(image_tensor(scene.image))
        items.append(item)
        if patch is not None:
            for name, value in patch_targets(scene, patch).items():
                targets[name].append(torch.from_numpy(value))
            targets["scene"].append(torch.from_numpy(scene_labels(scene)))
    if patch is None:
        return torch.stack(images), items
    return torch.stack(images), items, {name: torch.stack(v) for name, v in targets.items()}


def conversation(item: dict) -> str:
    """The training text of a question and its ``"more"`` follow-ups: LLaVA-style turns, image in the first.

    ``USER: <image> q1 ASSISTANT: a1 </s> USER: q2 ASSISTANT: a2 </s> ...``; the first turn is the
    single-question prompt evaluation uses (:data:`PROMPT`), and later turns supervise more answers per
    encoded image. A turn with a ``"text"`` (a training wording, see :func:`scene_batch`) is asked in those
    words instead of its ``"question"``.

    Example:
        >>> conversation({"question": "what colour?", "answer": "red", "more": [{"question": "how many?",
        ...                                                                   "answer": "2"}]})
        'USER: <image> what colour? ASSISTANT: red </s> USER: how many? ASSISTANT: 2 </s>'
    """
    text = PROMPT.format(question=item.get("text", item["question"])) + f" {item['answer']} </s>"
    return text + "".join(f" USER: {q.get('text', q['question'])} ASSISTANT: {q['answer']} </s>"
                          for q in item.get("more", []))


def answer_labels(input_ids: Tensor, tokenizer: Any, opening: tuple[str, str] = ("assistant", ":")) -> Tensor:
    """(B, T) labels of tokenised :func:`conversation` texts that keep every answer and mask the rest (-100).

    An answer is the tokens after each ``opening`` pair (``assistant :``; ChatML: ``<|im_start|> assistant``)
    up to and including the tokenizer's eos (``</s>``; ChatML: ``<|im_end|>``); padding, prompts and image
    placeholders are masked, so the loss is on the answers alone.

    Args:
        input_ids: (B, T) token ids (left padding and expanded image placeholders allowed).
        tokenizer: the word-level tokenizer that knows both ``opening`` tokens and its eos.
        opening: the two tokens that open an answer.
    """
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a (B, T) tensor, got {getattr(input_ids, 'shape', input_ids)!r}")
    first, second = tokenizer.convert_tokens_to_ids(list(opening))
    eos = tokenizer.eos_token_id
    rows = []
    for row in input_ids.tolist():
        labels, answering, previous = [], False, None
        for token in row:
            labels.append(token if answering else -100)
            answering = token != eos if answering else (previous, token) == (first, second)
            previous = token
        rows.append(labels)
    return torch.tensor(rows, dtype=input_ids.dtype, device=input_ids.device)
