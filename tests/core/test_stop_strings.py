"""StopStringMatcher: stop strings found in a stream of text deltas, across delta boundaries."""

import random

import pytest
from lmserve.core.stop_strings import StopStringMatcher


def feed(matcher: StopStringMatcher, deltas, can_stop=True) -> tuple[list[str], bool]:
    """Push ``deltas`` until a match; return the emitted pieces and whether one matched.

    Without a match the stream ends: the flushed text is the last piece.
    """
    pieces = []
    for delta in deltas:
        text, matched = matcher.push(delta, can_stop)
        pieces.append(text)
        if matched:
            return pieces, True
    pieces.append(matcher.flush())
    return pieces, False


def split(text: str, cuts) -> list[str]:
    cuts = sorted(set(cuts))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


def char_by_char(text: str, stops, include: bool) -> str:
    """The reference: stop as soon as a stop string is complete, cut before it
    (when two complete on the same character, the longer one starts earlier)."""
    for end in range(1, len(text) + 1):
        done = [stop for stop in stops if text[:end].endswith(stop)]
        if done:
            stop = max(done, key=len)
            return text[:end] if include else text[: end - len(stop)]
    return text


def test_a_stop_string_split_over_two_deltas():
    matcher = StopStringMatcher(["<|user|>"])
    assert matcher.push("Hello <|us") == ("Hello ", False)
    assert matcher.push("er|> and more") == ("", True)


def test_a_stop_string_split_over_three_deltas():
    matcher = StopStringMatcher(["STOP"])
    assert matcher.push("abc S") == ("abc ", False)
    assert matcher.push("T") == ("", False)
    assert matcher.push("OP tail") == ("", True)


def test_a_stop_string_split_into_single_characters():
    pieces, matched = feed(StopStringMatcher(["<|im_end|>"]), list("answer<|im_end|>ignored"))
    assert matched
    assert "".join(pieces) == "answer"
    assert all(piece == "" for piece in pieces[6:])  # held back from '<' on


def test_text_before_the_stop_in_the_same_delta_is_emitted():
    assert StopStringMatcher(["\n\n"]).push("one\n\ntwo") == ("one", True)


def test_the_earliest_of_several_stop_strings_wins():
    matcher = StopStringMatcher(["world", "lo"])
    assert matcher.push("hello world") == ("hel", True)
    matcher = StopStringMatcher(["lo", "world"])  # the order of the list does not matter
    assert matcher.push("hello world") == ("hel", True)


def test_the_earliest_stop_wins_across_deltas():
    pieces, matched = feed(StopStringMatcher(["cat", "dog"]), ["a do", "g and a cat"])
    assert matched and "".join(pieces) == "a "


def test_a_partial_prefix_that_does_not_match_is_released():
    matcher = StopStringMatcher(["abc"])
    assert matcher.push("xab") == ("x", False)
    assert matcher.push("x") == ("abx", False)
    assert matcher.flush() == ""


def test_a_partial_prefix_is_released_as_soon_as_it_cannot_match():
    matcher = StopStringMatcher(["abcd"])
    assert matcher.push("ab") == ("", False)
    assert matcher.push("c") == ("", False)
    assert matcher.push("e") == ("abce", False)


def test_the_held_text_is_re_examined_for_a_shorter_prefix():
    # "aab" with stop "aac": after "aa" + "a", "aa" is still a possible start.
    matcher = StopStringMatcher(["aac"])
    assert matcher.push("aa") == ("", False)
    assert matcher.push("a") == ("a", False)
    assert matcher.push("c!") == ("", True)


def test_include_in_output_keeps_the_stop_string():
    matcher = StopStringMatcher(["<|us", "END"], include_in_output=True)
    pieces, matched = feed(matcher, ["one E", "N", "D two"])
    assert matched and "".join(pieces) == "one END"


def test_include_in_output_cuts_right_after_the_earliest_stop():
    matcher = StopStringMatcher(["b", "cd"], include_in_output=True)
    assert matcher.push("acdb") == ("acd", True)


def test_can_stop_false_neither_matches_nor_holds_back():
    matcher = StopStringMatcher(["stop"])
    assert matcher.push("a stop and a st", can_stop=False) == ("a stop and a st", False)
    assert matcher.flush() == ""
    # Once stopping is allowed, the next occurrence ends the stream.
    assert matcher.push("op here", can_stop=True) == ("op here", False)
    assert matcher.push(" stop", can_stop=True) == (" ", True)


def test_can_stop_false_releases_text_held_earlier():
    matcher = StopStringMatcher(["stop"])
    assert matcher.push("x st") == ("x ", False)
    assert matcher.push("op", can_stop=False) == ("stop", False)


def test_flush_returns_the_held_tail_once():
    matcher = StopStringMatcher(["###"])
    assert matcher.push("end #") == ("end ", False)
    assert matcher.push("#") == ("", False)
    assert matcher.flush() == "##"
    assert matcher.flush() == ""


def test_no_match_and_nothing_held_gives_everything_back():
    pieces, matched = feed(StopStringMatcher(["zzz"]), ["abc", "def"])
    assert not matched and pieces == ["abc", "def", ""]


def test_empty_deltas_are_harmless():
    matcher = StopStringMatcher(["ab"])
    assert matcher.push("") == ("", False)
    assert matcher.push("a") == ("", False)
    assert matcher.push("") == ("", False)
    assert matcher.push("b") == ("", True)


def test_unicode_stop_strings():
    pieces, matched = feed(StopStringMatcher(["你好"]), ["说：你", "好世界"])
    assert matched and "".join(pieces) == "说："


@pytest.mark.parametrize("stops", [[""], ["a", ""]])
def test_empty_stop_strings_are_refused(stops):
    with pytest.raises(ValueError):
        StopStringMatcher(stops)


@pytest.mark.parametrize("include", [False, True])
def test_property_one_stop_any_split(include):
    """For random texts and split points, the pieces concatenate to the text cut at the stop."""
    rng = random.Random(1234 + include)
    alphabet = "ab<|>"
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))
        stop = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4)))
        cuts = [rng.randint(0, len(text)) for _ in range(rng.randint(0, 8))]
        matcher = StopStringMatcher([stop], include_in_output=include)
        pieces, matched = feed(matcher, split(text, cuts))
        index = text.find(stop)
        assert matched == (index != -1), (text, stop, cuts)
        if index == -1:
            expected = text
        else:
            expected = text[: index + len(stop)] if include else text[:index]
        assert "".join(pieces) == expected, (text, stop, cuts)


@pytest.mark.parametrize("include", [False, True])
def test_property_several_stops_of_equal_length_any_split(include):
    rng = random.Random(99 + include)
    alphabet = "abc"
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 20)))
        length = rng.randint(1, 3)
        stops = ["".join(rng.choice(alphabet) for _ in range(length)) for _ in range(rng.randint(1, 3))]
        cuts = [rng.randint(0, len(text)) for _ in range(rng.randint(0, 8))]
        pieces, matched = feed(StopStringMatcher(stops, include), split(text, cuts))
        found = [text.find(stop) for stop in stops if stop in text]
        if not found:
            assert not matched and "".join(pieces) == text
        else:
            first = min(found)
            assert matched
            assert "".join(pieces) == (text[: first + length] if include else text[:first]), (text, stops, cuts)


def test_property_held_text_is_bounded():
    """At most len(longest stop) - 1 characters are ever held back."""
    rng = random.Random(7)
    for _ in range(500):
        stops = ["".join(rng.choice("xy") for _ in range(rng.randint(1, 5))) for _ in range(2)]
        matcher = StopStringMatcher(stops)
        pushed = emitted = 0
        for _ in range(20):
            delta = "".join(rng.choice("xyz") for _ in range(rng.randint(0, 3)))
            text, matched = matcher.push(delta)
            if matched:
                break
            pushed += len(delta)
            emitted += len(text)
            assert 0 <= pushed - emitted <= max(map(len, stops)) - 1


def test_the_cut_does_not_depend_on_the_split_when_a_stop_lies_inside_another():
    stops = ["abcd", "bc"]
    text = "xabcd"
    expected = char_by_char(text, stops, include=False)  # "xa": "bc" completes first
    for deltas in (["xabcd"], list(text), ["xab", "cd"]):
        pieces, matched = feed(StopStringMatcher(stops), deltas)
        assert matched and "".join(pieces) == expected, deltas
