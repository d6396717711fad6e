"""Download tickets: who can make one, what one opens, and for how long."""

from __future__ import annotations

import pytest

from overnight.api.auth import Authenticator, Principal, Unauthorized, hash_key
from overnight.api.download_tickets import TICKET_SECONDS, make_ticket, ticket_key

ALICE, BOB = hash_key("sk-alice"), hash_key("sk-bob")
NOW = 1_800_000_000


def test_a_ticket_names_the_key_that_signed_it_until_it_expires() -> None:
    ticket = make_ticket(ALICE, "file-a", NOW + TICKET_SECONDS)
    for now in (NOW, NOW + TICKET_SECONDS):
        assert ticket_key(ticket, "file-a", [BOB, ALICE], now) == ALICE
    assert ticket_key(ticket, "file-a", [BOB, ALICE], NOW + TICKET_SECONDS + 1) is None  # expired
    assert ticket_key(ticket, "file-b", [BOB, ALICE], NOW) is None  # another file
    assert ticket_key(ticket, "file-a", [BOB], NOW) is None  # its key is no longer configured


def test_a_key_holder_cannot_make_a_long_lived_ticket() -> None:
    ticket = make_ticket(ALICE, "file-a", NOW + TICKET_SECONDS + 1)
    assert ticket_key(ticket, "file-a", [ALICE], NOW) is None


def test_a_ticket_signed_with_another_key_or_altered_opens_nothing() -> None:
    expires = NOW + 10
    forged = ALICE[:16] + make_ticket(BOB, "file-a", expires)[16:]  # alice's id, bob's mac
    assert ticket_key(forged, "file-a", [ALICE, BOB], NOW) is None
    good = make_ticket(ALICE, "file-a", expires)
    later = good.replace(f".{expires}.", f".{expires + 5}.")
    assert ticket_key(later, "file-a", [ALICE], NOW) is None


@pytest.mark.parametrize(
    "ticket", ["", "x", "..", f"{ALICE[:16]}..", f"{ALICE[:16]}.-5.00", f"{ALICE[:16]}.{'9' * 40}.00", "é.1.é",
               f"{ALICE[:16]}.{NOW}.{'é' * 64}", f"{ALICE[:16]}.١٢.00"],
)
def test_garbage_is_no_ticket(ticket: str) -> None:
    assert ticket_key(ticket, "file-a", [ALICE], NOW) is None


def test_the_authenticator_redeems_a_ticket_as_its_keys_caller() -> None:
    auth = Authenticator({ALICE: ("alice", False), BOB: ("root", True)})
    admin = auth.authenticate("Bearer sk-bob")
    ticket, expires = auth.download_ticket(admin, "file-a", NOW)
    assert expires == NOW + TICKET_SECONDS
    assert auth.redeem(ticket, "file-a", NOW) == Principal("root", is_admin=True)
    with pytest.raises(Unauthorized) as refused:
        auth.redeem(ticket, "file-b", NOW)
    assert refused.value.code == "invalid_download_ticket"
    assert "POST /v1/files/file-b/download_link" in str(refused.value)
