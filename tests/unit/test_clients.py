"""The kernel's per-client book of requests in flight, as plain data."""

from __future__ import annotations

from kernel.clients import ClientBook


def test_caps_per_client_public_per_client_and_public_in_all() -> None:
    book = ClientBook(limit=3, public_limit=1, public_total=2)
    book.add(b"a", 1, public=True)
    assert "1 unauthenticated requests in flight" in book.refusal(b"a", public=True)
    assert book.refusal(b"a", public=False) == ""  # a token's requests are not public ones
    book.add(b"b", 2, public=True)
    assert "the kernel holds 2 unauthenticated" in book.refusal(b"c", public=True)
    book.add(b"a", 3, public=False)
    book.add(b"a", 4, public=False)
    assert "3 requests in flight" in book.refusal(b"a", public=False)
    book.remove(b"a", 1, public=True)
    assert book.refusal(b"c", public=True) == "" and book.in_flight(b"a") == 2


def test_taking_a_client_returns_what_it_owned_and_frees_its_share() -> None:
    book = ClientBook(limit=10, public_limit=5, public_total=2)
    book.add(b"a", 1, public=True)
    book.add(b"a", 2, public=True)
    book.add(b"b", 3, public=False)
    assert book.refusal(b"z", public=True) != ""
    assert book.take(b"a") == {1, 2} and book.take(b"a") == set()
    assert book.refusal(b"z", public=True) == "" and len(book) == 1
    book.remove(b"a", 1, public=True)  # a late end of a request already taken: no effect
    assert book.refusal(b"z", public=True) == "" and len(book) == 1


def test_bytes_in_flight_are_bounded_per_client_and_in_all_but_one_request_always_passes() -> None:
    """The kernel holds a request's frames until it is answered: a tenant's
    near-limit frames would add up to gigabytes without a byte bound."""
    book = ClientBook(limit=100, public_limit=8, public_total=8, limit_bytes=1000, total_bytes=1500)
    assert book.refusal(b"a", False, 5000) == ""  # the first request of a client is never refused for size
    book.add(b"a", 1, False, 900)
    assert "exceed 1000 bytes" in book.refusal(b"a", False, 200)
    assert book.refusal(b"b", False, 500) == ""
    book.add(b"b", 2, False, 500)
    assert "1500 bytes in all" in book.refusal(b"c", False, 200)
    book.remove(b"a", 1, False, 900)
    assert book.refusal(b"c", False, 200) == "" and book.refusal(b"a", False, 900) == ""
    book.take(b"b")
    assert book.refusal(b"c", False, 1499) == ""
