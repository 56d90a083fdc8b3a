"""0-100 quality scores of generated text, as the HRM original's output analyzer defines them.

Source: EduardTalianu/HRM-_txt, `character_trigram_cosine_similarity.py` (class LanguageModelAnalyzer, commit
6bacc75), read and re-implemented here; SPEC.md does not describe it. "Words" are `re.findall(r"\\b\\w+\\b")` of
the lower-cased text; `round` is Python's (half to even), as in the original.

character_coherence  letter, whitespace and ASCII-punctuation shares r_l, r_s, r_p of all characters against
                     English's 0.75 / 0.15 / 0.05: mean of max(0, 100 - 200|r_l - .75|), max(0, 100 - 500|r_s - .15|),
                     max(0, 100 - 1000|r_p - .05|). Empty text: 0.
word_formation       share of words that are in the shipped word list (jaxlm/data/assets/quality_words.txt, the
                     original's 105 common words) or longer than 3 characters, x100, minus 5 per "malformed" word
                     (longer than 8 and not all letters), floored at 0. No words: 0.
sentence_structure   pieces between runs of . ! ?; per non-empty piece with >= 2 words: +20 if it has a/an/the,
                     +30 if it has was/were/is/are/had/have/do/did, +10 if it has > 2 words; the sum divided by the
                     number of non-empty pieces (shorter pieces count, scoring 0), capped at 100.
semantic_meaning     15 per phrase of the original's list found in the text (each counted once) + 5 per window of
                     3 consecutive words containing one, capped at 100. The list suits Alice-like prose only.
token_diversity      mean of min(100, 150 x type/token ratio) and min(100, 10 x population variance of word lengths).
repetition           (jaxlm's; the original has no such score) 100 x distinct / total word 3-grams: 100 = nothing
                     repeats, low = loops. Fewer than 3 words: 100 (0 without words).
overall              the original's: the rounded mean of its five scores (repetition is not part of it).
"""
from __future__ import annotations

import os
import re
import string
from typing import Dict, List

WORD_LIST_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "assets",
                              "quality_words.txt")
ARTICLES = ("a", "an", "the")
VERB_LIKE = ("was", "were", "is", "are", "had", "have", "do", "did")
MEANINGFUL_PHRASES = ("more to eat", "at last", "after the", "in her", "for her", "the book", "she was", "he was",
                      "they were", "to know", "to make", "to be", "of the", "and the", "with the")
ORIGINAL_SCORES = ("character_coherence", "word_formation", "sentence_structure", "semantic_meaning",
                   "token_diversity")


def load_word_list(path: str = WORD_LIST_FILE) -> frozenset:
  with open(path, encoding="utf-8") as f:
    return frozenset(w.strip() for w in f if w.strip() and not w.startswith("#"))


def words_of(text: str) -> List[str]:
  return re.findall(r"\b\w+\b", text.lower())


def character_coherence(text: str) -> int:
  if not text:
    return 0
  n = len(text)
  shares = (sum(c.isalpha() for c in text) / n, sum(c.isspace() for c in text) / n,
            sum(c in string.punctuation for c in text) / n)
  # (expected share, points lost per unit of deviation)
  targets = ((0.75, 200), (0.15, 500), (0.05, 1000))
  return round(sum(max(0.0, 100 - abs(s - want) * k) for s, (want, k) in zip(shares, targets)) / 3)


def word_formation(text: str, word_list: frozenset = None) -> int:
  words = words_of(text)
  if not words:
    return 0
  known = load_word_list() if word_list is None else word_list
  formed = sum(w in known or len(w) > 3 for w in words)
  malformed = sum(len(w) > 8 and not w.isalpha() for w in words)
  return round(max(0.0, formed / len(words) * 100 - malformed * 5))


def sentence_structure(text: str) -> int:
  pieces = [p.strip() for p in re.split(r"[.!?]+", text) if p.strip()]
  if not pieces:
    return 0
  points = 0
  for piece in pieces:
    words = words_of(piece)
    if len(words) < 2:
      continue
    points += 20 * any(w in ARTICLES for w in words) + 30 * any(w in VERB_LIKE for w in words) + 10 * (len(words) > 2)
  return min(100, round(points / len(pieces)))


def semantic_meaning(text: str) -> int:
  lower = text.lower()
  found = sum(p in lower for p in MEANINGFUL_PHRASES)
  words = words_of(text)
  windows = sum(any(p in " ".join(words[i:i + 3]) for p in MEANINGFUL_PHRASES) for i in range(len(words) - 2))
  return min(100, found * 15 + windows * 5)


def token_diversity(text: str) -> int:
  words = words_of(text)
  if not words:
    return 0
  ttr = len(set(words)) / len(words)
  lengths = [len(w) for w in words]
  mean = sum(lengths) / len(lengths)
  variance = sum((n - mean) ** 2 for n in lengths) / len(lengths)
  return round((min(100.0, ttr * 150) + min(100.0, variance * 10)) / 2)


def repetition(text: str) -> int:
  words = words_of(text)
  if len(words) < 3:
    return 100 if words else 0
  grams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
  return round(100 * len(set(grams)) / len(grams))


def scores(text: str, word_list: frozenset = None) -> Dict[str, int]:
  """Every score of `text`, plus the original's overall."""
  out = {"character_coherence": character_coherence(text), "word_formation": word_formation(text, word_list),
         "sentence_structure": sentence_structure(text), "semantic_meaning": semantic_meaning(text),
         "token_diversity": token_diversity(text), "repetition": repetition(text)}
  out["overall"] = round(sum(out[k] for k in ORIGINAL_SCORES) / len(ORIGINAL_SCORES))
  return out
