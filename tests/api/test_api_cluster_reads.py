"""Merging the workers' pages of the thing list (api/cluster_reads.py)."""

from __future__ import annotations

from ironshadow.api.cluster_reads import merge_pages


def summary(name: str, version: int | None = 1, connected: bool = False, seen: int | None = None):
    return {
        "name": name,
        "connected": connected,
        "lastSeen": seen,
        "version": version,
        "pendingDelta": False,
    }


def names(page):
    return [thing["name"] for thing in page[0]]


def test_pages_merge_in_name_order():
    page = merge_pages([([summary("a"), summary("d")], None), ([summary("b")], None)], 10)
    assert names(page) == ["a", "b", "d"]
    assert page[1] is None


def test_page_size_cuts_and_sets_cursor():
    page = merge_pages([([summary("a"), summary("c")], None), ([summary("b")], None)], 2)
    assert names(page) == ["a", "b"]
    assert page[1] == "b"


def test_names_past_smallest_cursor_wait():
    # The second worker stopped looking at "c": it may still have a thing between "c" and
    # "e", so "e" waits for the next page, which starts after "c".
    first = ([summary("a"), summary("e")], None)
    second = ([summary("b")], "c")
    page = merge_pages([first, second], 10)
    assert names(page) == ["a", "b"]
    assert page[1] == "c"


def test_name_on_two_workers_is_merged():
    # A client connected through worker 0 whose thing's shadow is on worker 1.
    on_zero = ([summary("press", version=None, connected=True, seen=20)], None)
    on_one = ([summary("press", version=7, seen=10)], None)
    (merged,), cursor = merge_pages([on_zero, on_one], 10)
    assert merged["connected"] is True
    assert merged["version"] == 7
    assert merged["lastSeen"] == 20
    assert cursor is None
