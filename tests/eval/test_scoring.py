"""Scorers on hand-made answers, and the parsing of --lengths / --depths / --context."""

from __future__ import annotations

import pytest

from sala.eval.scoring import exact_match, parse_depths, parse_token_list, string_match_all, string_match_part


def test_string_match_all_exact_partial_case_whitespace():
    assert string_match_all("The numbers are 1234567 and 7654321.", ["1234567", "7654321"]) == 1.0
    assert string_match_all("only 1234567 here", ["1234567", "7654321"]) == 0.5
    assert string_match_all("nothing", ["1234567", "7654321"]) == 0.0
    assert string_match_all("  APPLE-Pie\n\tand more  ", ["apple-pie"]) == 1.0  # case and surrounding whitespace
    assert string_match_all("sweet\n  lemon", ["Sweet lemon"]) == 1.0  # whitespace runs collapse
    assert string_match_all("a b c d", ["A", "b", "x", "y"]) == 0.5


def test_string_match_part_and_exact_match():
    assert string_match_part("Paris, I think", ["London", "paris"]) == 1.0
    assert string_match_part("Rome", ["London", "Paris"]) == 0.0
    assert exact_match(" 4821937.\n", "4821937")
    assert not exact_match("482193", "4821937")
    assert not exact_match("48 21937", "4821937")  # a split number is not the number


def test_string_match_all_needs_references():
    with pytest.raises(ValueError, match="at least one reference"):
        string_match_all("x", [])


@pytest.mark.parametrize("text,expected", [("8K", [8192]), ("8192", [8192]), ("1M", [1048576]),
                                           ("1K, 2k,4096", [1024, 2048, 4096])])
def test_parse_token_list(text, expected):
    assert parse_token_list(text) == expected


@pytest.mark.parametrize("text", ["", "8X", "1K,,2K", "0", "1.5", "K8", "-4K"])
def test_parse_token_list_rejects_malformed(text):
    with pytest.raises(ValueError, match="--lengths"):
        parse_token_list(text)


def test_parse_depths():
    assert parse_depths("0,25,50,75,100") == [0, 25, 50, 75, 100]
    assert parse_depths("12.5") == [12.5]
    with pytest.raises(ValueError, match=r"percents in \[0, 100\]"):
        parse_depths("0,150")
    with pytest.raises(ValueError, match="comma-separated percents"):
        parse_depths("0,half")
    with pytest.raises(ValueError, match="comma-separated percents"):
        parse_depths("")
