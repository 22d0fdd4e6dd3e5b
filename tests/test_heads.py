"""Head selection grammar: exact names, ranges, clear errors."""

import re

import pytest

from mmattn.heads import HeadEntry, parse_heads, resolve_heads

LAYERS = {f"transformer_blocks.{i}": 4 for i in range(12)} | {"single_transformer_blocks.0": 8}


def test_parse_forms():
    assert parse_heads("transformer_blocks.1:3,0") == [HeadEntry("transformer_blocks.1", (0, 3))]
    assert parse_heads("transformer_blocks.1:*") == [HeadEntry("transformer_blocks.1", None)]
    assert parse_heads("transformer_blocks.1") == [HeadEntry("transformer_blocks.1", None)]
    assert parse_heads("single_transformer_blocks.0:0-2,5") == [HeadEntry("single_transformer_blocks.0", (0, 1, 2, 5))]
    assert parse_heads("transformer_blocks.2-4:1; x.y:0") == [
        HeadEntry("transformer_blocks.2", (1,)), HeadEntry("transformer_blocks.3", (1,)),
        HeadEntry("transformer_blocks.4", (1,)), HeadEntry("x.y", (0,))]


def test_exact_names_not_prefixes():
    selected = resolve_heads("transformer_blocks.1", LAYERS)
    assert list(selected) == ["transformer_blocks.1"] and selected["transformer_blocks.1"] == (0, 1, 2, 3)


def test_entries_merge():
    assert resolve_heads("transformer_blocks.1:0; transformer_blocks.1:2", LAYERS) == {"transformer_blocks.1": (0, 2)}


@pytest.mark.parametrize("spec, message", [
    ("transformer_blocks.12:0", "valid layers: transformer_blocks.0-11 (4 heads each), single_transformer_blocks.0 (8 heads each)"),
    ("transformer_blocks.3:4", "has heads 0-3; got [4]"),
    ("transformer_blocks.3:a", "expected '*', 'i', 'i,j' or 'i-j'"),
    ("transformer_blocks.3:3-1", "is empty"),
    ("transformer_blocks.4-2", "is empty"),
    ("", "expected a selection"),
])
def test_errors_name_the_valid_range(spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        resolve_heads(spec, LAYERS)
