"""Interoperability tests: a Python grpcio client, with stubs generated from
proto/cardvault/v1/*.proto, against the real `cardvault` binary in dev mode.

Nothing here shares code with the Rust server or its tests: the stubs come
from the .proto files alone, and TLS is grpcio's own (BoringSSL), so this
catches wire-level and mTLS incompatibilities a Rust-only suite cannot.

Environment:
  CARDVAULT_BIN   path to the cardvault binary (required)
"""

import datetime
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
PROTO_DIR = REPO / "proto"
TENANT = "demo"
# Test card numbers (Luhn-valid Visa test PAN and a Luhn-invalid variant).
PAN = "4111111111111111"
BAD_PAN = "4111111111111112"
CVV = "737"
NAME = "Ada Lovelace"
EXP_YEAR = datetime.date.today().year + 3
START_TIMEOUT = 60
STOP_TIMEOUT = 30


# ----------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def pb(tmp_path_factory):
    """Generates Python stubs with grpcio-tools and imports them."""
    out = tmp_path_factory.mktemp("stubs")
    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in (PROTO_DIR / "cardvault" / "v1").glob("*.proto"))
    assert protos, f"no .proto files under {PROTO_DIR}"
    cmd = [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_DIR}",
           f"--python_out={out}", f"--grpc_python_out={out}", *protos]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert res.returncode == 0, f"protoc failed: {res.stderr}"
    sys.path.insert(0, str(out))
    from cardvault.v1 import audit_pb2, audit_pb2_grpc, token_pb2, token_pb2_grpc  # noqa: E402

    class Stubs:
        pass

    s = Stubs()
    s.token, s.token_grpc, s.audit, s.audit_grpc = token_pb2, token_pb2_grpc, audit_pb2, audit_pb2_grpc
    return s


class Vault:
    def __init__(self, proc, port, data_dir, stderr_path):
        self.proc = proc
        self.port = port
        self.data_dir = data_dir
        self.stderr_path = stderr_path
        self._channels = []

    def _read(self, name):
        return (self.data_dir / "certs" / name).read_bytes()

    def channel(self, identity=None):
        """mTLS channel presenting the dev certificate `identity` (None: no client cert)."""
        kwargs = {"root_certificates": self._read("ca.pem")}
        if identity is not None:
            kwargs["private_key"] = self._read(f"{identity}.key")
            kwargs["certificate_chain"] = self._read(f"{identity}.pem")
        creds = grpc.ssl_channel_credentials(**kwargs)
        ch = grpc.secure_channel(f"localhost:{self.port}", creds,
                                 options=(("grpc.ssl_target_name_override", "localhost"),))
        self._channels.append(ch)
        return ch

    def close_channels(self):
        for ch in self._channels:
            ch.close()
        self._channels.clear()


@pytest.fixture(scope="session")
def vault(tmp_path_factory):
    """Starts `cardvault dev` on a free loopback port; SIGTERM (then SIGKILL) at teardown."""
    binary = os.environ.get("CARDVAULT_BIN")
    if not binary:
        pytest.fail("set CARDVAULT_BIN to the cardvault binary")
    binary = str(pathlib.Path(binary).resolve())
    assert os.access(binary, os.X_OK), f"not executable: {binary}"
    base = tmp_path_factory.mktemp("vault")
    data_dir = base / "data"
    stderr_path = base / "stderr.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARDVAULT_")}
    env["CARDVAULT_LOG"] = "info"
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen([binary, "dev", "--listen", "127.0.0.1:0", "--data-dir", str(data_dir)],
                                stdout=subprocess.PIPE, stderr=err, env=env)
    found = {}
    ready = threading.Event()

    def pump():
        # Keep draining stdout so the server never blocks on a full pipe.
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if "addr" not in found and line.startswith("cardvault listening on "):
                found["addr"] = line[len("cardvault listening on "):]
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    v = None
    try:
        if not ready.wait(START_TIMEOUT) or "addr" not in found:
            pytest.fail("vault did not start:\n" + stderr_path.read_text(errors="replace"))
        port = int(found["addr"].rsplit(":", 1)[1])
        v = Vault(proc, port, data_dir, stderr_path)
        yield v
    finally:
        if v is not None:
            v.close_channels()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def token_stub(vault, pb, identity):
    return pb.token_grpc.TokenServiceStub(vault.channel(identity))


def tokenize(vault, pb, **overrides):
    req = dict(tenant=TENANT, pan=PAN, exp_month=12, exp_year=EXP_YEAR, cardholder_name=NAME, cvv=CVV)
    req.update(overrides)
    return token_stub(vault, pb, "merchant").Tokenize(pb.token.TokenizeRequest(**req), timeout=10)


def rpc_error(call):
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


# -------------------------------------------------------------------- tests


def test_health_reports_token_service_serving(vault):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(vault.channel("merchant"))
    deadline = time.monotonic() + 10
    while True:  # health follows the seal state, polled every 500 ms by the server
        resp = health.Check(health_pb2.HealthCheckRequest(service="cardvault.v1.TokenService"), timeout=5)
        if resp.status == health_pb2.HealthCheckResponse.SERVING or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    err = rpc_error(lambda: health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5))
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_tokenize_detokenize_round_trip_cvv_read_once(vault, pb):
    t = tokenize(vault, pb)
    assert t.token.startswith("tok_") and len(t.token) == 26
    assert (t.brand, t.last4, t.bin) == ("VISA", "1111", "411111")
    assert (t.exp_month, t.exp_year) == (12, EXP_YEAR)
    assert t.cvv_held is True and t.existing is False
    assert len(t.fingerprint) == 64 and PAN not in t.fingerprint
    assert t.created_at.seconds > 0

    processor = token_stub(vault, pb, "processor")
    req = pb.token.DetokenizeRequest(tenant=TENANT, token=t.token, purpose="authorization", include_cvv=True)
    first = processor.Detokenize(req, timeout=10)
    assert first.token == t.token
    assert first.pan == PAN
    assert (first.exp_month, first.exp_year) == (12, EXP_YEAR)
    assert first.cardholder_name == NAME
    assert first.brand == "VISA"
    assert first.cvv_status == pb.token.CVV_RETURNED
    assert first.HasField("cvv") and first.cvv == CVV

    second = processor.Detokenize(req, timeout=10)
    assert second.pan == PAN
    assert second.cvv_status == pb.token.CVV_NOT_AVAILABLE
    assert not second.HasField("cvv")

    no_cvv = processor.Detokenize(
        pb.token.DetokenizeRequest(tenant=TENANT, token=t.token, purpose="refund"), timeout=10)
    assert no_cvv.cvv_status == pb.token.CVV_NOT_REQUESTED


def test_metadata_and_delete_as_merchant(vault, pb):
    t = tokenize(vault, pb, cvv="")
    merchant = token_stub(vault, pb, "merchant")
    md = merchant.GetMetadata(pb.token.GetMetadataRequest(tenant=TENANT, token=t.token), timeout=10)
    assert (md.token, md.last4, md.bin, md.fingerprint) == (t.token, "1111", "411111", t.fingerprint)
    assert md.key_version >= 1 and md.cvv_held is False
    deleted = merchant.DeleteToken(pb.token.DeleteTokenRequest(tenant=TENANT, token=t.token), timeout=10)
    assert deleted.deleted is True
    err = rpc_error(lambda: merchant.GetMetadata(pb.token.GetMetadataRequest(tenant=TENANT, token=t.token),
                                                 timeout=10))
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_invalid_pan_is_invalid_argument_without_echo(vault, pb):
    err = rpc_error(lambda: tokenize(vault, pb, pan=BAD_PAN))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("pan:"), err.details()
    assert BAD_PAN not in err.details()
    assert BAD_PAN[:12] not in err.details() and CVV not in err.details()
    assert all(BAD_PAN not in str(v) for _, v in (err.trailing_metadata() or ()))


def test_merchant_cannot_detokenize(vault, pb):
    t = tokenize(vault, pb, cvv="")
    merchant = token_stub(vault, pb, "merchant")
    err = rpc_error(lambda: merchant.Detokenize(
        pb.token.DetokenizeRequest(tenant=TENANT, token=t.token, purpose="authorization", include_cvv=True),
        timeout=10))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert PAN not in err.details()


def test_processor_cannot_tokenize(vault, pb):
    processor = token_stub(vault, pb, "processor")
    err = rpc_error(lambda: processor.Tokenize(
        pb.token.TokenizeRequest(tenant=TENANT, pan=PAN, exp_month=12, exp_year=EXP_YEAR), timeout=10))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED


def test_unknown_token_is_not_found(vault, pb):
    processor = token_stub(vault, pb, "processor")
    err = rpc_error(lambda: processor.Detokenize(
        pb.token.DetokenizeRequest(tenant=TENANT, token="tok_" + "A" * 22, purpose="authorization"), timeout=10))
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_other_tenants_token_reads_as_not_found(vault, pb):
    t = tokenize(vault, pb, cvv="")
    other = token_stub(vault, pb, "other-processor")
    err = rpc_error(lambda: other.Detokenize(
        pb.token.DetokenizeRequest(tenant="other", token=t.token, purpose="authorization"), timeout=10))
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_batch_items_fail_on_their_own(vault, pb):
    merchant = token_stub(vault, pb, "merchant")
    resp = merchant.TokenizeBatch(pb.token.TokenizeBatchRequest(tenant=TENANT, items=[
        pb.token.TokenizeBatchItem(reference="good", pan=PAN, exp_month=1, exp_year=EXP_YEAR),
        pb.token.TokenizeBatchItem(reference="bad", pan=BAD_PAN, exp_month=1, exp_year=EXP_YEAR),
    ]), timeout=10)
    by_ref = {r.reference: r for r in resp.results}
    assert by_ref["good"].WhichOneof("result") == "ok"
    assert by_ref["bad"].WhichOneof("result") == "error"
    assert by_ref["bad"].error.code == "INVALID_ARGUMENT"
    assert BAD_PAN not in by_ref["bad"].error.message


def test_no_client_certificate_is_refused(vault, pb):
    stub = pb.token_grpc.TokenServiceStub(vault.channel(None))
    err = rpc_error(lambda: stub.GetMetadata(
        pb.token.GetMetadataRequest(tenant=TENANT, token="tok_" + "A" * 22), timeout=10))
    # The TLS handshake fails, so grpcio reports the channel as unavailable...
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert "Connection refused" not in err.details(), err.details()
    # ...while the same call with a client certificate reaches the server.
    err = rpc_error(lambda: token_stub(vault, pb, "merchant").GetMetadata(
        pb.token.GetMetadataRequest(tenant=TENANT, token="tok_" + "A" * 22), timeout=10))
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_auditor_query_returns_the_detokenize_event(vault, pb):
    t = tokenize(vault, pb, cvv="")
    purpose = "interop audit check"
    token_stub(vault, pb, "processor").Detokenize(
        pb.token.DetokenizeRequest(tenant=TENANT, token=t.token, purpose=purpose), timeout=10)
    audit = pb.audit_grpc.AuditServiceStub(vault.channel("auditor"))
    resp = audit.Query(pb.audit.AuditQueryRequest(tenant=TENANT, action="Detokenize", token=t.token), timeout=10)
    assert len(resp.events) == 1, resp
    ev = resp.events[0]
    assert ev.action == "Detokenize"
    assert ev.token == t.token
    assert ev.tenant == TENANT
    assert ev.purpose == purpose
    assert ev.outcome == "OK"
    assert ev.principal == "spiffe://cardvault.dev/demo/processor"
    assert "processor" in ev.roles
    assert ev.seq > 0 and ev.tenant_seq > 0 and len(ev.hash) == 64
    assert PAN not in str(ev) and NAME not in str(ev)
    # Card data is not the auditor's: it cannot detokenize.
    err = rpc_error(lambda: token_stub(vault, pb, "auditor").Detokenize(
        pb.token.DetokenizeRequest(tenant=TENANT, token=t.token, purpose="x"), timeout=10))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    # And a merchant cannot read the audit log.
    merchant_audit = pb.audit_grpc.AuditServiceStub(vault.channel("merchant"))
    err = rpc_error(lambda: merchant_audit.Query(pb.audit.AuditQueryRequest(tenant=TENANT), timeout=10))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED


def test_audit_chain_verifies(vault, pb):
    audit = pb.audit_grpc.AuditServiceStub(vault.channel("auditor"))
    resp = audit.Verify(pb.audit.VerifyAuditRequest(), timeout=30)
    assert resp.ok, resp.problem
    assert resp.records > 0


def test_sealed_tokenize_from_the_documented_wire_format(vault, pb):
    """Builds a sealed card from TokenizeSealedRequest's proto comment alone,
    with pyhpke, and reads it back as the processor."""
    import base64
    import json

    from pyhpke import AEADId, CipherSuite, KDFId, KEMId

    merchant = token_stub(vault, pb, "merchant")
    s = merchant.CreateCollectSession(pb.token.CreateCollectSessionRequest(tenant=TENANT), timeout=10)
    assert (s.kem_id, s.kdf_id, s.aead_id) == (0x0010, 0x0001, 0x0002)
    assert len(s.public_key) == 65 and s.public_key[0] == 4

    suite = CipherSuite.new(KEMId(s.kem_id), KDFId(s.kdf_id), AEADId(s.aead_id))
    info = b"cardvault-collect-v1"
    aad = info + b"\x00" + TENANT.encode() + b"\x00" + s.session_id.encode()
    enc, sender = suite.create_sender_context(suite.kem.deserialize_public_key(s.public_key), info=info)
    card = {"pan": PAN, "exp_month": 12, "exp_year": EXP_YEAR, "cvv": CVV, "name": NAME}
    ct = sender.seal(json.dumps(card).encode(), aad=aad)
    sealed = "v1." + base64.urlsafe_b64encode(enc + ct).decode().rstrip("=")

    t = merchant.TokenizeSealed(
        pb.token.TokenizeSealedRequest(tenant=TENANT, session_id=s.session_id, sealed=sealed), timeout=10)
    assert (t.brand, t.last4) == ("VISA", "1111") and t.cvv_held
    back = token_stub(vault, pb, "processor").Detokenize(
        pb.token.DetokenizeRequest(tenant=TENANT, token=t.token, purpose="authorization", include_cvv=True),
        timeout=10)
    assert (back.pan, back.cvv, back.cardholder_name) == (PAN, CVV, NAME)

    # The session is used up: the same seal again is refused.
    err = rpc_error(lambda: merchant.TokenizeSealed(
        pb.token.TokenizeSealedRequest(tenant=TENANT, session_id=s.session_id, sealed=sealed), timeout=10))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_zz_sigterm_shuts_down_cleanly(vault):
    """Runs last (file order): SIGTERM drains and exits 0."""
    vault.close_channels()
    vault.proc.send_signal(signal.SIGTERM)
    assert vault.proc.wait(STOP_TIMEOUT) == 0, vault.stderr_path.read_text(errors="replace")[-2000:]
