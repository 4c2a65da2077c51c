"""The login state machine (RFC 7143 sections 6, 11.12, 11.13, 12, 13), driven with dataclasses.

The request sequences mirror what libiscsi (lib/login.c) sends: with no CHAP user it logs in with one
operational-stage PDU (T=1, NSG=3); with a CHAP user it sends AuthMethod=CHAP,None (T=1), then
CHAP_A=5 (T=0), then CHAP_N/CHAP_R [+ CHAP_I/CHAP_C] (T=1), then the operational PDU, repeating
InitiatorName, TargetName and SessionType there.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from frontend.iscsi.keys import MAX_TEXT_BYTES, parse_text
from frontend.iscsi.login import (
    LoginFailed,
    LoginMachine,
    LoginState,
    LoginStep,
    LoginSucceeded,
    Stage,
    TargetMoved,
)
from frontend.iscsi.params import SessionType
from frontend.iscsi.pdu import LoginRequest, LoginResponse
from frontend.target import (
    ChapConfig,
    ChapSecret,
    Portal,
    RemoteTarget,
    Target,
    TargetRegistry,
    TargetSettings,
)

INITIATOR = "iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test"
IQN = "iqn.2026-11.io.sparrow:vol1"
CHAP_IQN = "iqn.2026-11.io.sparrow:secure"
MUTUAL_IQN = "iqn.2026-11.io.sparrow:mutual"
MOVED_IQN = "iqn.2026-11.io.sparrow:moved"          # served by another node of the cluster
PRIMARY = Portal("192.0.2.7", 3261, tpgt=4)
ISID = 0x23D000000001
CHALLENGE = bytes(range(0xA0, 0xB0))
CHAP_ID = 0x2A

ONE_WAY = ChapConfig(initiator=ChapSecret("alice", "alice-secret"))
MUTUAL = ChapConfig(initiator=ChapSecret("alice", "alice-secret"), target=ChapSecret("sparrow", "tgt-secret"))

SETTINGS = TargetSettings(portals=(Portal("192.0.2.1", 3260),), tpgt=1, login_timeout=15.0, cmd_window=128)

LIBISCSI_OPERATIONAL = [
    ("HeaderDigest", "None,CRC32C"),
    ("DataDigest", "None"),
    ("InitialR2T", "No"),
    ("ImmediateData", "Yes"),
    ("MaxBurstLength", "262144"),
    ("FirstBurstLength", "262144"),
    ("DefaultTime2Wait", "2"),
    ("DefaultTime2Retain", "0"),
    ("MaxOutstandingR2T", "1"),
    ("ErrorRecoveryLevel", "0"),
    ("IFMarker", "No"),
    ("OFMarker", "No"),
    ("MaxConnections", "1"),
    ("MaxRecvDataSegmentLength", "65536"),
    ("DataPDUInOrder", "Yes"),
    ("DataSequenceInOrder", "Yes"),
]


@dataclass
class FakeSessions:
    existing: set[int] = field(default_factory=set)
    next_tsih: int = 0x11
    issued: list[int] = field(default_factory=list)

    def tsih_exists(self, tsih: int) -> bool:
        return tsih in self.existing

    def new_tsih(self) -> int:
        self.issued.append(self.next_tsih)
        return self.next_tsih


def registry(discovery_chap: ChapConfig | None = None) -> TargetRegistry:
    reg = TargetRegistry(discovery_chap=discovery_chap)
    lu = cast(Any, object())
    reg.add(Target(IQN, "vol1", lu))
    reg.add(Target(CHAP_IQN, "secure", lu, chap=ONE_WAY))
    reg.add(Target(MUTUAL_IQN, "mutual", lu, chap=MUTUAL))
    reg.add_remote(RemoteTarget(MOVED_IQN, "moved", PRIMARY))
    return reg


def fixed_random(n: int) -> bytes:
    return bytes([CHAP_ID]) if n == 1 else CHALLENGE[:n]


def machine(
    settings: TargetSettings = SETTINGS,
    sessions: FakeSessions | None = None,
    now: float = 1000.0,
    discovery_chap: ChapConfig | None = None,
) -> LoginMachine:
    return LoginMachine(
        settings, registry(discovery_chap), sessions or FakeSessions(), now=now, random_bytes=fixed_random
    )


Keys = list[tuple[str, str]]


def text(keys: Keys) -> bytes:
    return b"".join(f"{k}={v}".encode() + b"\0" for k, v in keys)


def request(
    csg: int,
    nsg: int,
    transit: bool,
    keys: Keys | bytes | None = None,
    *,
    cont: bool = False,
    isid: int = ISID,
    tsih: int = 0,
    itt: int = 0x77,
    cid: int = 0,
    cmd_sn: int = 100,
    exp_stat_sn: int = 7,
    version_min: int = 0,
    version_max: int = 0,
) -> LoginRequest:
    data = keys if isinstance(keys, bytes) else text(keys or [])
    return LoginRequest(
        transit=transit, cont=cont, csg=csg, nsg=nsg, version_max=version_max, version_min=version_min,
        isid=isid, tsih=tsih, itt=itt, cid=cid, cmd_sn=cmd_sn, exp_stat_sn=exp_stat_sn, data=data,
    )


def identity(target: str | None = IQN, session_type: str = "Normal") -> Keys:
    keys = [("InitiatorName", INITIATOR), ("InitiatorAlias", "host1")]
    if target is not None:
        keys.append(("TargetName", target))
    keys.append(("SessionType", session_type))
    return keys


def answers(response: LoginResponse) -> dict[str, str]:
    pairs = parse_text(response.data)
    result = {p.key: p.value for p in pairs}
    assert len(result) == len(pairs), "a key answered twice"
    return result


def failed(step: LoginStep) -> LoginFailed:
    assert isinstance(step.outcome, LoginFailed), step
    assert (step.response.status_class, step.response.status_detail) == (
        step.outcome.status_class, step.outcome.status_detail,
    )
    assert not step.response.transit
    return step.outcome


def status(step: LoginStep) -> tuple[int, int]:
    outcome = failed(step)
    return outcome.status_class, outcome.status_detail


def succeeded(step: LoginStep) -> LoginSucceeded:
    assert isinstance(step.outcome, LoginSucceeded), step
    assert step.response.status_class == 0 and step.response.status_detail == 0
    assert step.response.transit and step.response.nsg == Stage.FULL_FEATURE
    return step.outcome


def md5(*parts: bytes) -> bytes:
    return hashlib.md5(b"".join(parts)).digest()


# --- successful logins -----------------------------------------------------------------------


def test_libiscsi_login_without_security_stage() -> None:
    sessions = FakeSessions()
    m = machine(sessions=sessions)
    step = m.receive(request(1, 3, True, identity() + LIBISCSI_OPERATIONAL), 1000.5)
    done = succeeded(step)
    r = step.response
    assert (r.csg, r.nsg, r.cont) == (1, 3, False)
    assert (r.isid, r.itt, r.tsih) == (ISID, 0x77, 0x11)
    assert (r.stat_sn, r.exp_cmd_sn, r.max_cmd_sn) == (7, 100, 100 + 128 - 1)
    assert (r.version_max, r.version_active) == (0, 0)
    assert answers(r) == {
        "TargetPortalGroupTag": "1",
        "HeaderDigest": "None",
        "DataDigest": "None",
        "InitialR2T": "No",
        "ImmediateData": "Yes",
        "MaxBurstLength": "262144",
        "FirstBurstLength": "65536",
        "DefaultTime2Wait": "2",
        "DefaultTime2Retain": "0",
        "MaxOutstandingR2T": "1",
        "ErrorRecoveryLevel": "0",
        "IFMarker": "No",
        "OFMarker": "No",
        "MaxConnections": "1",
        "DataPDUInOrder": "Yes",
        "DataSequenceInOrder": "Yes",
        "MaxRecvDataSegmentLength": str(SETTINGS.max_recv_data_segment_length),
    }
    assert done.target is not None and done.target.iqn == IQN
    p = done.params
    assert p.session_type is SessionType.NORMAL
    assert (p.initiator_name, p.initiator_alias, p.target_name) == (INITIATOR, "host1", IQN)
    assert (p.isid, p.tsih) == (ISID, 0x11)
    assert (p.header_digest, p.data_digest) == (False, False)
    assert p.max_send_data_segment_length == 65536
    assert p.max_recv_data_segment_length == SETTINGS.max_recv_data_segment_length
    assert (p.max_burst_length, p.first_burst_length) == (262144, 65536)
    assert (p.initial_r2t, p.immediate_data) == (False, True)
    assert (p.default_time2wait, p.default_time2retain, p.error_recovery_level) == (2, 0, 0)
    assert sessions.issued == [0x11]
    assert m.state is LoginState.SUCCEEDED
    assert m.next_stat_sn == 8


def test_defaults_apply_to_keys_not_negotiated() -> None:
    step = machine().receive(request(1, 3, True, identity()), 1000.0)
    p = succeeded(step).params
    assert answers(step.response) == {"TargetPortalGroupTag": "1", "MaxRecvDataSegmentLength": "262144"}
    assert (p.max_send_data_segment_length, p.max_burst_length, p.first_burst_length) == (8192, 262144, 65536)
    assert (p.initial_r2t, p.immediate_data, p.max_outstanding_r2t) == (True, True, 1)
    assert (p.data_pdu_in_order, p.data_sequence_in_order) == (True, True)
    assert (p.default_time2wait, p.default_time2retain, p.error_recovery_level) == (2, 20, 0)
    assert (p.header_digest, p.data_digest, p.max_connections) == (False, False, 1)


def test_security_stage_without_chap() -> None:
    m = machine()
    step = m.receive(request(0, 1, True, [*identity(), ("AuthMethod", "CHAP,None")]), 1000.0)
    assert step.outcome is None
    r = step.response
    assert (r.transit, r.csg, r.nsg, r.tsih, r.stat_sn) == (True, 0, 1, 0, 7)
    assert answers(r) == {"TargetPortalGroupTag": "1", "AuthMethod": "None"}
    assert m.stage is Stage.OPERATIONAL
    # libiscsi repeats its identity keys in the operational stage
    step = m.receive(request(1, 3, True, identity() + LIBISCSI_OPERATIONAL), 1000.0)
    succeeded(step)
    assert "TargetPortalGroupTag" not in answers(step.response)  # only in the first response
    assert step.response.stat_sn == 8


def test_security_stage_straight_to_full_feature() -> None:
    step = machine().receive(request(0, 3, True, [*identity(), ("AuthMethod", "None")]), 1000.0)
    done = succeeded(step)
    assert step.response.csg == 0
    # our declaration still reaches the initiator before full-feature phase
    assert answers(step.response)["MaxRecvDataSegmentLength"] == "262144"
    assert done.params.max_send_data_segment_length == 8192


def test_security_stage_without_auth_method_defaults_to_none() -> None:
    m = machine()
    step = m.receive(request(0, 1, True, identity()), 1000.0)
    assert step.outcome is None and step.response.transit


def test_target_stays_in_stage_when_initiator_does_not_transit() -> None:
    m = machine()
    step = m.receive(request(1, 0, False, [*identity(), ("HeaderDigest", "CRC32C")]), 1000.0)
    assert step.outcome is None
    assert (step.response.transit, step.response.csg) == (False, 1)
    assert answers(step.response)["HeaderDigest"] == "CRC32C"
    step = m.receive(request(1, 3, True, [("DataDigest", "CRC32C,None")]), 1000.0)
    p = succeeded(step).params
    assert (p.header_digest, p.data_digest) == (True, True)


def test_discovery_login() -> None:
    sessions = FakeSessions()
    m = machine(sessions=sessions)
    step = m.receive(request(1, 3, True, identity(None, "Discovery") + LIBISCSI_OPERATIONAL), 1000.0)
    done = succeeded(step)
    assert done.target is None
    assert done.params.session_type is SessionType.DISCOVERY
    assert done.params.target_name is None
    assert step.response.tsih == 0x11
    a = answers(step.response)
    assert "TargetPortalGroupTag" not in a
    for key in ("InitialR2T", "ImmediateData", "MaxBurstLength", "FirstBurstLength", "MaxOutstandingR2T",
                "DataPDUInOrder", "DataSequenceInOrder", "MaxConnections"):
        assert a[key] == "Irrelevant", key
    assert a["HeaderDigest"] == "None"
    assert a["ErrorRecoveryLevel"] == "0"
    assert done.params.max_send_data_segment_length == 65536


def test_discovery_ignores_a_target_name() -> None:
    keys = identity("iqn.2026-11.io.sparrow:nope", "Discovery")
    step = machine().receive(request(1, 3, True, keys), 1000.0)
    assert succeeded(step).target is None


@pytest.mark.parametrize(
    ("header", "data", "expected"),
    [
        ("None,CRC32C", "None", (False, False)),
        ("CRC32C,None", "CRC32C,None", (True, True)),
        ("CRC32C", "None,CRC32C", (True, False)),
        ("None", "CRC32C", (False, True)),
    ],
)
def test_digests(header: str, data: str, expected: tuple[bool, bool]) -> None:
    keys = [*identity(), ("HeaderDigest", header), ("DataDigest", data)]
    p = succeeded(machine().receive(request(1, 3, True, keys), 1000.0)).params
    assert (p.header_digest, p.data_digest) == expected


def test_target_name_is_case_insensitive() -> None:
    step = machine().receive(request(1, 3, True, identity(IQN.upper().replace("IQN", "iqn"))), 1000.0)
    assert succeeded(step).params.target_name == IQN


def test_first_burst_is_bounded_by_max_burst() -> None:
    keys = [*identity(), ("FirstBurstLength", "65536"), ("MaxBurstLength", "16384")]
    step = machine().receive(request(1, 3, True, keys), 1000.0)
    a = answers(step.response)
    assert (a["MaxBurstLength"], a["FirstBurstLength"]) == ("16384", "16384")
    p = succeeded(step).params
    assert (p.max_burst_length, p.first_burst_length) == (16384, 16384)


def test_settings_bound_the_answers() -> None:
    tight = TargetSettings(max_burst_length=65536, first_burst_length=8192, max_outstanding_r2t=2,
                           max_recv_data_segment_length=16384, cmd_window=16)
    keys = [
        *identity(), ("MaxBurstLength", "262144"), ("FirstBurstLength", "262144"), ("MaxOutstandingR2T", "8")
    ]
    step = machine(tight).receive(request(1, 3, True, keys, cmd_sn=0xFFFFFFF8), 1000.0)
    a = answers(step.response)
    assert (a["MaxBurstLength"], a["FirstBurstLength"], a["MaxOutstandingR2T"]) == ("65536", "8192", "2")
    assert a["MaxRecvDataSegmentLength"] == "16384"
    assert step.response.max_cmd_sn == (0xFFFFFFF8 + 15) & 0xFFFFFFFF  # serial arithmetic wraps
    assert succeeded(step).params.max_recv_data_segment_length == 16384


# --- CHAP ------------------------------------------------------------------------------------


def chap_login_until_challenge(m: LoginMachine, target: str) -> None:
    step = m.receive(request(0, 1, True, [*identity(target), ("AuthMethod", "CHAP,None")]), 1000.0)
    assert step.outcome is None
    assert not step.response.transit  # authentication is not done yet
    assert answers(step.response) == {"TargetPortalGroupTag": "1", "AuthMethod": "CHAP"}
    step = m.receive(request(0, 1, False, [("CHAP_A", "5")]), 1000.0)
    assert step.outcome is None and not step.response.transit
    assert answers(step.response) == {"CHAP_A": "5", "CHAP_I": str(CHAP_ID), "CHAP_C": "0x" + CHALLENGE.hex()}


def test_one_way_chap_login() -> None:
    m = machine()
    chap_login_until_challenge(m, CHAP_IQN)
    response = md5(bytes([CHAP_ID]), b"alice-secret", CHALLENGE)
    keys = [("CHAP_N", "alice"), ("CHAP_R", "0x" + response.hex().upper())]
    step = m.receive(request(0, 1, True, keys), 1000.0)
    assert step.outcome is None
    assert (step.response.transit, step.response.csg, step.response.nsg) == (True, 0, 1)
    assert answers(step.response) == {}
    step = m.receive(request(1, 3, True, identity(CHAP_IQN) + LIBISCSI_OPERATIONAL), 1000.0)
    assert succeeded(step).params.target_name == CHAP_IQN
    assert step.response.stat_sn == 10  # 7, 8, 9, 10: one StatSN per response


def test_mutual_chap_login() -> None:
    m = machine()
    chap_login_until_challenge(m, MUTUAL_IQN)
    ours = md5(bytes([CHAP_ID]), b"alice-secret", CHALLENGE)
    theirs = bytes(range(32))
    keys = [("CHAP_N", "alice"), ("CHAP_R", "0x" + ours.hex()), ("CHAP_I", "1"),
            ("CHAP_C", "0x" + theirs.hex().upper())]
    step = m.receive(request(0, 1, True, keys), 1000.0)
    assert step.outcome is None and step.response.transit
    assert answers(step.response) == {
        "CHAP_N": "sparrow",
        "CHAP_R": "0x" + md5(b"\x01", b"tgt-secret", theirs).hex(),
    }
    succeeded(m.receive(request(1, 3, True, identity(MUTUAL_IQN)), 1000.0))


def test_discovery_chap() -> None:
    m = machine(discovery_chap=ONE_WAY)
    step = m.receive(request(1, 3, True, identity(None, "Discovery")), 1000.0)
    assert status(step) == (2, 1)
    m = machine(discovery_chap=ONE_WAY)
    step = m.receive(request(0, 1, True, [*identity(None, "Discovery"), ("AuthMethod", "CHAP")]), 1000.0)
    assert answers(step.response) == {"AuthMethod": "CHAP"}


@pytest.mark.parametrize(
    "keys",
    [
        [("CHAP_N", "bob"), ("CHAP_R", "0x" + md5(bytes([CHAP_ID]), b"alice-secret", CHALLENGE).hex())],
        [("CHAP_N", "alice"), ("CHAP_R", "0x" + md5(bytes([CHAP_ID]), b"wrong", CHALLENGE).hex())],
        [("CHAP_N", "alice")],
    ],
)
def test_chap_failures(keys: Keys) -> None:
    m = machine()
    chap_login_until_challenge(m, CHAP_IQN)
    step = m.receive(request(0, 1, True, keys), 1000.0)
    assert status(step) == (2, 1)
    # nothing is served after a failed login, not even a correct retry
    good = [("CHAP_N", "alice"), ("CHAP_R", "0x" + md5(bytes([CHAP_ID]), b"alice-secret", CHALLENGE).hex())]
    assert isinstance(m.receive(request(0, 1, True, good), 1000.0).outcome, LoginFailed)
    assert isinstance(m.receive(request(1, 3, True, identity(CHAP_IQN)), 1000.0).outcome, LoginFailed)


def test_mutual_chap_requested_but_not_configured() -> None:
    m = machine()
    chap_login_until_challenge(m, CHAP_IQN)
    keys = [("CHAP_N", "alice"), ("CHAP_R", "0x" + md5(bytes([CHAP_ID]), b"alice-secret", CHALLENGE).hex()),
            ("CHAP_I", "1"), ("CHAP_C", "0x0102030405060708")]
    assert status(m.receive(request(0, 1, True, keys), 1000.0)) == (2, 1)


def test_reflected_challenge() -> None:
    m = machine()
    chap_login_until_challenge(m, MUTUAL_IQN)
    keys = [("CHAP_N", "alice"), ("CHAP_R", "0x" + md5(bytes([CHAP_ID]), b"alice-secret", CHALLENGE).hex()),
            ("CHAP_I", "1"), ("CHAP_C", "0x" + CHALLENGE.hex())]
    assert status(m.receive(request(0, 1, True, keys), 1000.0)) == (2, 1)


def test_chap_required_but_operational_stage_first() -> None:
    step = machine().receive(request(1, 3, True, identity(CHAP_IQN)), 1000.0)
    assert status(step) == (2, 1)


@pytest.mark.parametrize("methods", ["None", "KRB5,SRP"])
def test_chap_required_but_not_offered(methods: str) -> None:
    step = machine().receive(request(0, 1, True, [*identity(CHAP_IQN), ("AuthMethod", methods)]), 1000.0)
    assert status(step) == (2, 1)


def test_chap_required_but_no_auth_method_and_transit() -> None:
    step = machine().receive(request(0, 1, True, identity(CHAP_IQN)), 1000.0)
    assert status(step) == (2, 1)


def test_chap_offered_only_but_not_configured() -> None:
    step = machine().receive(request(0, 1, True, [*identity(), ("AuthMethod", "CHAP")]), 1000.0)
    assert status(step) == (2, 1)


def test_chap_keys_before_auth_method() -> None:
    step = machine().receive(request(0, 1, False, [*identity(CHAP_IQN), ("CHAP_A", "5")]), 1000.0)
    assert status(step) == (2, 1)


def test_security_keys_in_operational_stage() -> None:
    step = machine().receive(request(1, 3, True, [*identity(), ("AuthMethod", "None")]), 1000.0)
    assert status(step) == (2, 0)


def test_transit_requested_while_chap_in_progress_is_refused() -> None:
    m = machine()
    chap_login_until_challenge(m, CHAP_IQN)
    step = m.receive(request(0, 1, True), 1000.0)  # no CHAP_R yet
    assert step.outcome is None and not step.response.transit
    assert m.stage is Stage.SECURITY


# --- failures --------------------------------------------------------------------------------


@pytest.mark.parametrize(("vmin", "vmax"), [(1, 2), (1, 0), (2, 5)])
def test_unsupported_version(vmin: int, vmax: int) -> None:
    step = machine().receive(request(1, 3, True, identity(), version_min=vmin, version_max=vmax), 1000.0)
    assert status(step) == (2, 5)


def test_version_range_including_zero_is_accepted() -> None:
    succeeded(machine().receive(request(1, 3, True, identity(), version_min=0, version_max=3), 1000.0))


def test_missing_initiator_name() -> None:
    step = machine().receive(request(1, 3, True, [("TargetName", IQN)]), 1000.0)
    assert status(step) == (2, 7)


def test_missing_target_name() -> None:
    step = machine().receive(request(1, 3, True, identity(None)), 1000.0)
    assert status(step) == (2, 7)


def test_unknown_target() -> None:
    step = machine().receive(request(1, 3, True, identity("iqn.2026-11.io.sparrow:nope")), 1000.0)
    assert status(step) == (2, 3)
    assert step.response.data == b""


def test_unsupported_session_type() -> None:
    step = machine().receive(request(1, 3, True, identity(IQN, "Special")), 1000.0)
    assert status(step) == (2, 9)


def test_bad_initiator_name() -> None:
    step = machine().receive(request(1, 3, True, [("InitiatorName", "host"), ("TargetName", IQN)]), 1000.0)
    assert status(step) == (2, 0)


def test_adding_a_connection_to_an_unknown_session() -> None:
    step = machine().receive(request(1, 3, True, identity(), tsih=5), 1000.0)
    assert status(step) == (2, 0x0A)


def test_adding_a_connection_to_an_existing_session() -> None:
    m = machine(sessions=FakeSessions(existing={5}))
    step = m.receive(request(1, 3, True, identity(), tsih=5), 1000.0)
    assert status(step) == (2, 6)
    assert step.response.tsih == 5


def test_duplicate_key_in_one_text() -> None:
    keys = [*identity(), ("MaxBurstLength", "65536"), ("MaxBurstLength", "65536")]
    assert status(machine().receive(request(1, 3, True, keys), 1000.0)) == (2, 0)


def test_renegotiation_across_requests() -> None:
    m = machine()
    assert m.receive(request(1, 0, False, [*identity(), ("MaxBurstLength", "65536")]), 1000.0).outcome is None
    assert status(m.receive(request(1, 3, True, [("MaxBurstLength", "65536")]), 1000.0)) == (2, 0)


def test_identity_change_during_login() -> None:
    m = machine()
    m.receive(request(0, 1, True, [*identity(), ("AuthMethod", "None")]), 1000.0)
    keys = [("InitiatorName", "iqn.2020-01.com.example:other"), ("TargetName", IQN)]
    assert status(m.receive(request(1, 3, True, keys), 1000.0)) == (2, 0)


def test_identity_key_introduced_late() -> None:
    m = machine()
    m.receive(request(0, 1, True, [("InitiatorName", INITIATOR), ("TargetName", IQN)]), 1000.0)
    assert status(m.receive(request(1, 3, True, [("SessionType", "Normal")]), 1000.0)) == (2, 0)


@pytest.mark.parametrize(
    ("csg", "nsg", "transit", "cont"),
    [
        (3, 0, False, False),   # CSG full-feature
        (2, 3, True, False),    # CSG reserved
        (1, 2, True, False),    # NSG reserved
        (1, 1, True, False),    # no move
        (1, 0, True, False),    # backwards
        (0, 0, True, False),
        (1, 3, True, True),     # T and C together
    ],
)
def test_bad_stage_fields(csg: int, nsg: int, transit: bool, cont: bool) -> None:
    step = machine().receive(request(csg, nsg, transit, identity(), cont=cont), 1000.0)
    assert status(step) == (2, 0)


def test_wrong_stage_after_transition() -> None:
    m = machine()
    m.receive(request(0, 1, True, [*identity(), ("AuthMethod", "None")]), 1000.0)
    assert status(m.receive(request(0, 1, True), 1000.0)) == (2, 0)


def test_stage_cannot_change_without_target_consent() -> None:
    m = machine()
    m.receive(request(0, 1, False, [*identity(), ("AuthMethod", "None")]), 1000.0)
    assert m.stage is Stage.SECURITY
    assert status(m.receive(request(1, 3, True), 1000.0)) == (2, 0)


@pytest.mark.parametrize("changed", [{"isid": ISID + 1}, {"tsih": 9}, {"cid": 1}])
def test_header_fields_must_not_change(changed: dict[str, int]) -> None:
    m = machine(sessions=FakeSessions(existing={9}))
    m.receive(request(0, 1, False, [*identity(), ("AuthMethod", "None")]), 1000.0)
    step = m.receive(request(0, 1, True, **changed), 1000.0)  # type: ignore[arg-type]
    assert status(step) == (2, 0)


def test_receive_after_success() -> None:
    m = machine()
    succeeded(m.receive(request(1, 3, True, identity()), 1000.0))
    assert status(m.receive(request(1, 3, True, identity()), 1000.0)) == (2, 0x0B)


# --- unknown, irrelevant and rejected keys ---------------------------------------------------


def test_unknown_and_vendor_keys_are_not_understood() -> None:
    keys = [
        *identity(), ("X-com.example.feature", "1"), ("X#org.example", "y"), ("FancyKey", "3"),
        ("sENDtARGETS", "aLL"),
    ]
    a = answers(machine().receive(request(1, 3, True, keys), 1000.0).response)
    assert a["X-com.example.feature"] == a["X#org.example"] == a["FancyKey"] == "NotUnderstood"
    assert a["sENDtARGETS"] == "NotUnderstood"


def test_bad_values_and_target_keys_are_rejected() -> None:
    keys = [
        *identity(), ("MaxBurstLength", "lots"), ("MaxOutstandingR2T", "0"), ("TargetAlias", "x"),
        ("TargetPortalGroupTag", "1"), ("SendTargets", "All"), ("OFMarkInt", "1~2"),
    ]
    step = machine().receive(request(1, 3, True, keys), 1000.0)
    a = answers(step.response)
    for key in ("MaxBurstLength", "MaxOutstandingR2T", "TargetAlias", "SendTargets", "OFMarkInt"):
        assert a[key] == "Reject", key
    assert a["TargetPortalGroupTag"] == "1"  # our declaration; the initiator's copy is dropped
    p = succeeded(step).params
    assert (p.max_burst_length, p.max_outstanding_r2t) == (262144, 1)


# --- text robustness and continuation --------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"InitiatorName" + b"\0",
        b"InitiatorName=\xff\xfe\0",
        b"K" * 64 + b"=1\0",
        text(identity()) + b"InitiatorAlias2=" + b"a" * 9000 + b"\0",
        text([("InitiatorName", INITIATOR), ("InitiatorAlias", "a" * 256), ("TargetName", IQN)]),
    ],
)
def test_garbage_text_is_an_initiator_error(data: bytes) -> None:
    step = machine().receive(request(1, 3, True, data), 1000.0)
    assert status(step) == (2, 0)


def test_c_bit_continuation() -> None:
    m = machine()
    whole = text(identity() + LIBISCSI_OPERATIONAL)
    pieces = [whole[:10], whole[10:57], whole[57:]]  # splits inside keys and values
    for piece in pieces[:-1]:
        step = m.receive(request(1, 3, False, piece, cont=True), 1000.0)
        assert step.outcome is None
        r = step.response
        assert (r.transit, r.cont, r.csg, r.data, r.status_class) == (False, False, 1, b"", 0)
    step = m.receive(request(1, 3, True, pieces[-1]), 1000.0)
    assert succeeded(step).params.max_send_data_segment_length == 65536
    assert step.response.stat_sn == 9


def test_c_bit_text_is_capped() -> None:
    m = machine()
    chunk = b"X-pad=" + b"a" * 8000 + b"\0"
    outcome = None
    sent = 0
    while outcome is None:
        step = m.receive(request(1, 3, False, chunk, cont=True), 1000.0)
        outcome = step.outcome
        sent += len(chunk)
        assert sent <= MAX_TEXT_BYTES + len(chunk)
    assert status(step) == (2, 0)


def test_too_many_answers_fail_cleanly() -> None:
    keys = identity() + [(f"X-k{i}", "1") for i in range(700)]  # 700 * "X-kNNN=NotUnderstood\0" > 8192
    assert status(machine().receive(request(1, 3, True, keys), 1000.0)) == (2, 0)


# --- redirection to the volume's primary (RFC 7143 11.13.5, 13.8) -------------------------------


def redirected(step: LoginStep, address: str = "192.0.2.7:3261") -> LoginFailed:
    """The response is "target moved temporarily" carrying only TargetAddress, and login is over."""
    outcome = failed(step)
    assert (outcome.status_class, outcome.status_detail) == (0x01, 0x01)
    r = step.response
    assert (r.status_class, r.status_detail) == (0x01, 0x01)
    # exactly one key, and no portal group tag after the address (13.8: MUST be omitted in a redirect)
    assert r.data == f"TargetAddress={address}".encode() + b"\0"
    assert r.tsih == 0 and not r.transit and not r.cont
    assert address in outcome.reason
    return outcome


def test_libiscsi_first_security_request_to_a_remote_target_is_redirected() -> None:
    sessions = FakeSessions()
    m = machine(sessions=sessions)
    req = request(0, 1, True, [*identity(MOVED_IQN), ("AuthMethod", "CHAP,None")], exp_stat_sn=41)
    step = m.receive(req, 1000.0)
    redirected(step)
    r = step.response
    assert (r.isid, r.itt, r.csg, r.nsg) == (ISID, 0x77, 0, 0)
    assert (r.stat_sn, r.exp_cmd_sn, r.max_cmd_sn) == (41, 100, 100 + 128 - 1)
    assert sessions.issued == []                       # no session was created
    assert m.state is LoginState.FAILED
    assert status(m.receive(request(0, 1, True, [("AuthMethod", "None")]), 1000.0)) == (2, 0)


def test_operational_first_request_to_a_remote_target_is_redirected() -> None:
    step = machine().receive(request(1, 3, True, identity(MOVED_IQN) + LIBISCSI_OPERATIONAL), 1000.0)
    redirected(step)
    assert step.response.csg == 1
    assert "TargetPortalGroupTag" not in answers(step.response)


def test_remote_target_name_is_case_insensitive() -> None:
    name = MOVED_IQN.replace("sparrow", "SPARROW")
    redirected(machine().receive(request(1, 3, True, identity(name)), 1000.0))


def test_redirect_is_answered_before_chap() -> None:
    """A redirected CHAP target answers the first request with the portal, asking for no proof: the
    initiator authenticates at the primary (RFC 7143 11.13.5; tgt does the same)."""
    reg = registry()
    reg.redirect(CHAP_IQN, PRIMARY)
    m = LoginMachine(SETTINGS, reg, FakeSessions(), now=1000.0, random_bytes=fixed_random)
    step = m.receive(request(0, 1, True, [*identity(CHAP_IQN), ("AuthMethod", "CHAP,None")]), 1000.0)
    redirected(step)
    assert "AuthMethod" not in answers(step.response) and "CHAP_C" not in answers(step.response)


def test_local_target_redirected_and_back() -> None:
    reg = registry()
    reg.redirect(IQN, Portal("2001:db8::9", 3270, tpgt=2))

    def login() -> LoginStep:
        m = LoginMachine(SETTINGS, reg, FakeSessions(), now=1000.0, random_bytes=fixed_random)
        return m.receive(request(1, 3, True, identity(IQN) + LIBISCSI_OPERATIONAL), 1000.0)

    redirected(login(), "[2001:db8::9]:3270")
    reg.redirect(IQN, None)                            # the primary is this node again
    done = succeeded(login())
    assert done.target is reg.get(IQN)


def test_redirect_after_split_text() -> None:
    m = machine()
    whole = text(identity(MOVED_IQN) + LIBISCSI_OPERATIONAL)
    step = m.receive(request(1, 3, False, whole[:40], cont=True), 1000.0)
    assert step.outcome is None and step.response.data == b""
    step = m.receive(request(1, 3, True, whole[40:]), 1000.0)
    redirected(step)
    assert step.response.stat_sn == 8


def test_discovery_is_not_redirected_by_remote_targets() -> None:
    keys = identity(MOVED_IQN, "Discovery") + LIBISCSI_OPERATIONAL
    assert succeeded(machine().receive(request(1, 3, True, keys), 1000.0)).target is None


def test_target_moved_carries_its_wire_code() -> None:
    e = TargetMoved(RemoteTarget(MOVED_IQN, "moved", PRIMARY))
    assert (e.status_class, e.status_detail, e.address) == (0x01, 0x01, "192.0.2.7:3261")


# --- time ------------------------------------------------------------------------------------


def test_deadline() -> None:
    m = machine(now=500.0)
    assert m.deadline == 515.0
    assert m.receive(request(0, 1, False, [*identity(), ("AuthMethod", "None")]), 514.9).outcome is None
    step = m.receive(request(0, 3, True), 515.0)
    assert status(step) == (2, 0)
    assert "timed out" in failed(step).reason


# --- nothing escapes receive() ---------------------------------------------------------------

KEY_NAMES = ["InitiatorName", "TargetName", "SessionType", "AuthMethod", "CHAP_A", "CHAP_I", "CHAP_C",
             "CHAP_N", "CHAP_R", "HeaderDigest", "MaxBurstLength", "FirstBurstLength", "InitialR2T",
             "MaxRecvDataSegmentLength", "ErrorRecoveryLevel", "TargetAlias", "SendTargets", "X-a", "Bogus",
             "OFMarker", "TaskReporting", "DefaultTime2Wait"]
VALUES = st.one_of(
    st.sampled_from(["", "None", "CHAP", "CHAP,None", "5", "Yes", "No", "0", "512", "0x10", "0bAA==",
                     "Normal", "Discovery", "All", IQN, CHAP_IQN, MOVED_IQN, INITIATOR, "alice",
                     "CRC32C,None",
                     "0x" + "00" * 16, "99999999999999999999999", "a,,b"]),
    st.text(max_size=20),
)
SOUP = st.lists(st.tuples(st.sampled_from(KEY_NAMES), VALUES), max_size=12).map(text)
DATA = st.one_of(SOUP, st.binary(max_size=80))
REQUESTS = st.builds(
    request,
    csg=st.integers(0, 3),
    nsg=st.integers(0, 3),
    transit=st.booleans(),
    keys=DATA,
    cont=st.booleans(),
    tsih=st.sampled_from([0, 0, 0, 5, 9]),
    cid=st.sampled_from([0, 0, 1]),
    version_min=st.sampled_from([0, 0, 1]),
    version_max=st.sampled_from([0, 0, 2]),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(REQUESTS, st.floats(0, 30)), min_size=1, max_size=8), st.booleans())
def test_random_request_sequences_never_raise(sequence: list[tuple[LoginRequest, float]], chap: bool) -> None:
    m = machine(SETTINGS, FakeSessions(existing={5}), now=0.0, discovery_chap=ONE_WAY if chap else None)
    finished = False
    for req, now in sequence:
        step = m.receive(req, now)
        assert isinstance(step.response, LoginResponse)
        assert step.response.isid == req.isid and step.response.itt == req.itt
        if finished:
            assert isinstance(step.outcome, LoginFailed)  # nothing after the end
        if step.outcome is not None:
            finished = True
        if isinstance(step.outcome, LoginFailed):
            assert step.response.status_class != 0


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(KEY_NAMES), VALUES), max_size=20))
def test_random_key_soups_never_raise(soup: Keys) -> None:
    for csg, nsg in ((0, 1), (1, 3)):
        m = machine()
        step = m.receive(request(csg, nsg, True, identity() + soup), 1000.0)
        assert step.response.itt == 0x77
