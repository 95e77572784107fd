"""Frontend detokenizer: multi-byte characters split across tokens, spacing, stop strings."""

from __future__ import annotations

import pytest

from engine.weights import tiny
from services.frontend.detokenizer import IncrementalDetokenizer, StopMatcher

TEXT = "héllo wörld 日本語 😀 done"


@pytest.fixture(scope="module")
def byte_tok():
    return tiny.byte_tokenizer()


@pytest.fixture(scope="module")
def smol_tok():
    from engine.weights.gguf_file import GGUFModel
    from engine.weights.loader import smollm2_path

    try:
        return GGUFModel(smollm2_path()).tokenizer()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"smollm2 unavailable: {exc}")


def stream(tok, ids, prompt=()):
    d = IncrementalDetokenizer(tok, list(prompt))
    parts = [d.push([t]) for t in ids]
    parts.append(d.flush())
    return parts


@pytest.mark.parametrize("which", ["byte", "smol"])
def test_multibyte_split_across_tokens(which, byte_tok, request):
    tok = byte_tok if which == "byte" else request.getfixturevalue("smol_tok")
    ids = tok.encode(TEXT)
    parts = stream(tok, ids)
    assert "".join(parts) == TEXT == tok.decode(ids)
    assert not any("\ufffd" in p for p in parts)  # never a broken character
    if which == "byte":
        assert len(ids) > len(TEXT)  # really split


def test_spacing_with_prompt_context(smol_tok):
    prompt = smol_tok.encode("The answer is")
    out = smol_tok.encode(" forty two, and then some more words")
    assert "".join(stream(smol_tok, out, prompt)) == smol_tok.decode(out)
    full = smol_tok.decode(prompt + out)
    assert full.endswith("".join(stream(smol_tok, out, prompt)))


def test_long_stream_window_stays_bounded(byte_tok):
    ids = byte_tok.encode(TEXT * 20)
    d = IncrementalDetokenizer(byte_tok)
    text = "".join(d.push([t]) for t in ids) + d.flush()
    assert text == TEXT * 20 and len(d.ids) < 40


def test_incomplete_character_at_end_is_flushed(byte_tok):
    ids = byte_tok.encode("a😀")[:-1]
    parts = stream(byte_tok, ids)
    assert parts[0] == "a" and "".join(parts[1:-1]) == "" and parts[-1] == "\ufffd"


def test_stop_string_spanning_deltas():
    m = StopMatcher(["STOP", "\n\n"])
    out = []
    for piece in ["hello S", "T", "O", "P tail"]:
        text, stopped = m.feed(piece)
        out.append(text)
        if stopped:
            break
    assert "".join(out) == "hello " and stopped


def test_stop_string_earliest_wins_and_flush():
    m = StopMatcher(["bb", "a"])
    assert m.feed("xxbba") == ("xx", True)
    m = StopMatcher(["END"])
    t, s = m.feed("abcEN")
    assert (t, s) == ("abc", False)
    assert m.flush() == "EN"
    assert StopMatcher([]).feed("x") == ("x", False)


def test_stop_string_across_multibyte_tokens(byte_tok):
    ids = byte_tok.encode("price: 5€ per 日本 unit")
    d, m = IncrementalDetokenizer(byte_tok), StopMatcher(["日本"])
    out, stopped = "", False
    for t in ids:
        text, stopped = m.feed(d.push([t]))
        out += text
        if stopped:
            break
    assert stopped and out == "price: 5€ per "
