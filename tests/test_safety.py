"""jaxlm.safety: the blocklist matches whole words and phrases (word boundaries on both sides, any whitespace
inside a phrase, any case), and the stream guard never shows a blocked entry. The chat's use of it: test_chat.py."""
import pytest

from jaxlm.safety import DEFAULT_BLOCKLIST, Blocklist, StreamGuard, read_blocklist


def test_blocklist_matches_whole_words_case_insensitively():
  words = Blocklist(read_blocklist(DEFAULT_BLOCKLIST) + ["hate you"])
  assert words.find("Skills, killers and harmony") is None
  assert words.find("I will KILL.") == "KILL"
  assert words.find("harm") == "harm"
  assert words.find("i  hate\tyou!") in ("hate\tyou", "hate")
  assert Blocklist([]).find("kill") is None


@pytest.mark.parametrize("text", ["a skill", "skill", "overkill", "roadkill is not", "_kill", "3kill", "a\tskill",
                                  "unharmed", "pharm"])
def test_no_match_that_continues_a_word_on_the_left(text):
  assert Blocklist(["kill", "harm"]).find(text) is None


@pytest.mark.parametrize("text", ["killer", "kills", "killing it", "kill_", "kill3", "harmony", "harms"])
def test_no_match_that_continues_a_word_on_the_right(text):
  assert Blocklist(["kill", "harm"]).find(text) is None


@pytest.mark.parametrize("text,hit", [("kill", "kill"), ("kill it", "kill"), ("to kill", "kill"),
                                      ("(kill)", "kill"), ("-kill-", "kill"), ("skill, kill!", "kill"),
                                      ("killer\nkill", "kill"), ("\tkill\n", "kill"), ("self-harm", "harm")])
def test_a_whole_word_matches_between_any_non_word_characters(text, hit):
  assert Blocklist(["kill", "harm"]).find(text) == hit


@pytest.mark.parametrize("entry,text,hit", [("kill", "KILL!", "KILL"), ("kill", "a Kill", "Kill"),
                                            ("KiLL", "kill", "kill"), ("hate you", "I HATE YOU", "HATE YOU"),
                                            ("HATE You", "i hate yOu", "hate yOu"), ("übel", "ganz ÜBEL", "ÜBEL")])
def test_matching_ignores_the_case_of_the_text_and_of_the_entry(entry, text, hit):
  assert Blocklist([entry]).find(text) == hit          # reported as written in the text


@pytest.mark.parametrize("gap", [" ", "  ", "\t", "\n", "\r\n", " \t \n ", "\u00a0"])
def test_a_phrase_matches_with_any_whitespace_between_its_words(gap):
  phrases = Blocklist(["hate you", "go  away\tnow"])   # an entry's own whitespace is normalised too
  assert phrases.find(f"I hate{gap}you!") == f"hate{gap}you"
  assert phrases.find(f"Go{gap}away{gap}NOW") == f"Go{gap}away{gap}NOW"
  assert phrases.find(f"hate{gap}yours") is None and phrases.find(f"whate{gap}you") is None


def test_a_phrase_needs_whitespace_between_its_words():
  phrases = Blocklist(["hate you"])
  assert phrases.find("hateyou") is None and phrases.find("hate you") == "hate you"
  assert phrases.find("I hate it, you know") is None


def test_the_longest_entry_is_reported():
  both = Blocklist(["hate", "hate you"])
  assert both.find("I hate \n you") == "hate \n you"
  assert both.find("I hate it") == "hate"


def test_read_blocklist_skips_comments_and_normalises_entries(tmp_path):
  path = tmp_path / "list.txt"
  path.write_text("# header\n\nKill  # trailing comment\n   Hate\t\tYou  \n#only a comment\n")
  assert read_blocklist(str(path)) == ["kill", "hate you"]
  loaded = Blocklist.load(str(path))
  assert len(loaded) == 2 and loaded.source == str(path) and loaded.find("HATE\nyou") == "HATE\nyou"
  with pytest.raises(FileNotFoundError, match="cannot read the blocklist"):
    read_blocklist(str(tmp_path / "missing.txt"))
  assert {"hate", "kill", "harm"} <= set(read_blocklist(DEFAULT_BLOCKLIST))


# ------------------------------------------------------------------------------ streaming
def stream(blocklist, text):
  """(text shown, hit) when `text` streams into a fresh StreamGuard one character at a time, then as final."""
  guard = StreamGuard(blocklist)
  shown = ""
  for end in range(1, len(text) + 1):
    new, hit = guard.feed(text[:end])
    shown += new
    if hit:
      return shown, hit
  new, hit = guard.feed(text, final=True)
  return shown + new, hit


def test_stream_guard_never_releases_a_blocked_word():
  guard = StreamGuard(Blocklist(["harm"]))
  text, shown, hit = "we harmonize harm now", "", None
  for end in range(1, len(text) + 1):
    new, hit = guard.feed(text[:end])
    shown += new
    if hit:
      break
  assert hit == "harm" and shown == "we harmonize " and end == len("we harmonize harm ")
  guard = StreamGuard(Blocklist(["hate you"]))
  shown = "".join(guard.feed(t)[0] for t in ("I hate", "I hate yo", "I hate yours "))
  shown += guard.feed("I hate yours ok", final=True)[0]
  assert shown == "I hate yours ok" and guard.hit is None
  guard = StreamGuard(Blocklist(["hate you"]))
  assert guard.feed("I hate ")[0] == "I " and guard.feed("I hate you", final=True) == ("", "hate you")


@pytest.mark.parametrize("text", ["a skill and overkill", "killers skills", "Harmony, pharmacy; unharmed."])
def test_stream_guard_releases_everything_without_a_whole_word_match(text):
  assert stream(Blocklist(["kill", "harm"]), text) == (text, None)


@pytest.mark.parametrize("text,shown,hit", [
    ("so KILL them", "so ", "KILL"),
    ("I hate\n\tyou so", "I ", "hate\n\tyou"),
    ("I hate  you", "I ", "hate  you"),             # a hit only when the reply is final: still not shown
    ("skill then kill", "skill then ", "kill"),
])
def test_stream_guard_stops_at_a_whole_word_or_phrase_with_any_whitespace(text, shown, hit):
  assert stream(Blocklist(["kill", "hate you"]), text) == (shown, hit)


def test_stream_guard_reports_the_hit_once_and_then_releases_nothing():
  guard = StreamGuard(Blocklist(["kill"]))
  assert guard.feed("ok kill ") == ("ok ", "kill")
  assert guard.feed("ok kill more text", final=True) == ("", "kill")
  assert guard.hit == "kill" and guard.released == len("ok ")
