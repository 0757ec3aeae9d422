"""Stop strings over a token stream (llama.cpp backend): nothing after a stop string is sent, a
stop string split across tokens is caught, and text that only looked like one is released."""

from __future__ import annotations

from deepinfer_nb.engine.backends.stops import StopMatcher


def run(stops: list[str], pieces: list[str]) -> tuple[str, str]:
    m = StopMatcher(stops)
    sent = []
    for piece in pieces:
        text, hit = m.feed(piece)
        sent.append(text)
        if hit:
            return "".join(sent), hit
    return "".join(sent) + m.flush(), ""


def test_no_stop_strings_passes_everything_at_once() -> None:
    m = StopMatcher([])
    assert m.feed("Par") == ("Par", "")
    assert m.feed("is") == ("is", "")


def test_stop_string_split_across_tokens_is_cut_before_it() -> None:
    assert run(["Paris"], ["The capital is P", "ar", "is.", " More"]) == (
        "The capital is ",
        "Paris",
    )


def test_partial_match_is_held_then_released() -> None:
    m = StopMatcher(["Paris"])
    assert m.feed("Pa") == ("", "")  # could become Paris
    assert m.feed("nama") == ("Panama", "")  # it did not: released
    assert m.flush() == ""


def test_earliest_of_several_stop_strings_wins() -> None:
    assert run(["world", "lo"], ["hello world"]) == ("hel", "lo")


def test_output_without_a_stop_is_complete_after_flush() -> None:
    assert run(["###"], ["a #", "# b #"]) == ("a ## b #", "")
