"""TargetRegistry: targets served here, targets served elsewhere, and redirecting between the two."""

from __future__ import annotations

from typing import Any, cast

import pytest

from frontend.target import Portal, RemoteTarget, Target, TargetRegistry

A = "iqn.2026-11.io.sparrow:alpha"
B = "iqn.2026-11.io.sparrow:beta"
C = "iqn.2026-11.io.sparrow:gamma"
NODE2 = Portal("192.0.2.2", 3260, tpgt=1)
NODE3 = Portal("192.0.2.3", 3261, tpgt=1)


def local(iqn: str) -> Target:
    return Target(iqn, iqn.rsplit(":", 1)[1], cast(Any, object()))


def test_portal_addresses() -> None:
    """SendTargets carries the portal group tag; a redirect must not (RFC 7143 13.8)."""
    assert Portal("192.0.2.2", 3260, 5).address() == "192.0.2.2:3260,5"
    assert Portal("192.0.2.2", 3260, 5).redirect_address() == "192.0.2.2:3260"
    assert Portal("2001:db8::1", 3261, 2).address() == "[2001:db8::1]:3261,2"
    assert Portal("2001:db8::1", 3261, 2).redirect_address() == "[2001:db8::1]:3261"
    assert Portal("node1.example.com", 3262).redirect_address() == "node1.example.com:3262"


def test_local_targets_as_before() -> None:
    reg = TargetRegistry()
    a = local(A)
    reg.add(a)
    assert reg.get(A) is a and reg.resolve(A) is a and reg.remote(A) is None
    assert list(reg) == [a] and len(reg) == 1
    assert reg.remove(A) is a
    assert reg.get(A) is None and reg.resolve(A) is None and len(reg) == 0
    assert reg.remove(A) is None


def test_remote_target_is_known_but_not_served_here() -> None:
    reg = TargetRegistry()
    remote = RemoteTarget(B, "beta", NODE2)
    reg.add_remote(remote)
    assert reg.get(B) is None              # nothing to serve here
    assert reg.resolve(B) is remote and reg.remote(B) is remote
    moved = RemoteTarget(B, "beta", NODE3)
    reg.add_remote(moved)                  # the primary changed
    assert reg.resolve(B) is moved and len(reg) == 1
    assert reg.remove(B) is None           # no local target to return ...
    assert reg.resolve(B) is None and len(reg) == 0   # ... but it is forgotten


def test_redirect_a_local_target_and_back() -> None:
    reg = TargetRegistry()
    a = local(A)
    reg.add(a)
    reg.redirect(A, NODE2)
    assert reg.resolve(A) == RemoteTarget(A, "alpha", NODE2)
    assert reg.get(A) is a                 # the LU stays (a replica keeps its copy)
    reg.redirect(A, NODE3)
    assert reg.resolve(A) == RemoteTarget(A, "alpha", NODE3)
    reg.redirect(A, None)
    assert reg.resolve(A) is a and reg.remote(A) is None
    reg.redirect(A, None)                  # already served here: nothing changes
    assert reg.resolve(A) is a


def test_redirect_needs_a_local_target() -> None:
    reg = TargetRegistry()
    reg.add_remote(RemoteTarget(B, "beta", NODE2))
    with pytest.raises(KeyError):
        reg.redirect(B, NODE3)
    with pytest.raises(KeyError):
        reg.redirect(C, None)
    assert reg.resolve(B) == RemoteTarget(B, "beta", NODE2)


def test_adding_a_local_target_does_not_clear_a_redirect() -> None:
    """A replica opening its copy must not start serving it: only redirect(iqn, None) does that."""
    reg = TargetRegistry()
    reg.add_remote(RemoteTarget(A, "alpha", NODE2))
    a = local(A)
    reg.add(a)
    assert reg.resolve(A) == RemoteTarget(A, "alpha", NODE2)
    reg.redirect(A, None)
    assert reg.resolve(A) is a


def test_remove_forgets_a_redirected_target_entirely() -> None:
    reg = TargetRegistry()
    a = local(A)
    reg.add(a)
    reg.redirect(A, NODE2)
    assert reg.remove(A) is a
    assert reg.resolve(A) is None and reg.remote(A) is None and list(reg) == []


def test_iteration_lists_each_iqn_once_resolved_in_order() -> None:
    reg = TargetRegistry()
    a, c = local(A), local(C)
    reg.add(c)
    reg.add(a)
    reg.add_remote(RemoteTarget(B, "beta", NODE3))
    reg.redirect(C, NODE2)
    assert list(reg) == [a, RemoteTarget(B, "beta", NODE3), RemoteTarget(C, "gamma", NODE2)]
    assert len(reg) == 3
    # iterating a snapshot: removing while iterating (as closing every target does) is safe
    for entry in reg:
        reg.remove(entry.iqn)
    assert len(reg) == 0
