"""Security without a cluster: CurveZMQ keys and sockets (protocol.security), `kvferry keys
generate`, the SDK endpoint's API key and message limit, nothing pickled on any wire, loopback
binding by default."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import dataclasses
import os
import stat
import threading
from pathlib import Path

import pytest
import zmq
import zmq.asyncio
import zmq.auth

from cli.main import main as kvferry
from protocol import ClusterAddresses, Ping, Pong, SchedulerInbound, SchedulerReplies, decode, encode
from protocol.security import KeyFileError, curve_keys, generate_keys, load_keys, secure, use_curve
from protocol.sockets import MessageSocket, request, serve
from services.config import KvferryConfig, load_config
from tests.test_frontend_http import ANSWER, TOK, FakeCluster, make_cfg

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[1]
ROLES = ["scheduler", "frontend", "worker", "client"]


@pytest.fixture
def keys_dir(tmp_path) -> Path:
    d = tmp_path / "keys"
    generate_keys(d)
    return d


def free_endpoint() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


# ---- key files -----------------------------------------------------------------------------------

def test_keys_generate_layout_permissions_and_refusal(tmp_path, capsys):
    d = tmp_path / "k"
    assert kvferry(["keys", "generate", str(d)]) == 0
    names = sorted(p.name for p in d.iterdir())
    assert names == sorted([f"{r}.key" for r in ROLES] + [f"{r}.key_secret" for r in ROLES])
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    for p in d.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    for r in ROLES:  # zmq's own certificate reader understands them; the public file has no secret
        public, secret = zmq.auth.load_certificate(d / f"{r}.key_secret")
        assert zmq.auth.load_certificate(d / f"{r}.key") == (public, None)
        assert len(public) == len(secret) == 40
    assert len({zmq.auth.load_certificate(d / f"{r}.key")[0] for r in ROLES}) == 4  # one keypair per role
    before = (d / "worker.key_secret").read_bytes()
    assert kvferry(["keys", "generate", str(d)]) == 2  # never overwrites by accident
    assert "exists" in capsys.readouterr().err
    assert (d / "worker.key_secret").read_bytes() == before
    assert kvferry(["keys", "generate", str(d), "--services", "worker,alice", "--force"]) == 0
    assert (d / "worker.key_secret").read_bytes() != before and (d / "alice.key").exists()
    assert kvferry(["keys", "generate", str(d), "--services", "../evil"]) == 2  # names are file names


def test_load_keys_errors_name_the_file(tmp_path, keys_dir):
    with pytest.raises(KeyFileError, match="does not exist"):
        load_keys(tmp_path / "nowhere", "worker")
    (keys_dir / "client.key_secret").unlink()
    with pytest.raises(KeyFileError, match="client.key_secret"):
        load_keys(keys_dir, "client")
    (keys_dir / "worker.key_secret").write_text("curve\n    public-key = \"short\"\n")
    with pytest.raises(KeyFileError, match="worker.key_secret"):
        load_keys(keys_dir, "worker")
    assert curve_keys(ClusterAddresses(), "worker") is None  # Curve off by default
    keys = curve_keys(ClusterAddresses(curve_keys_dir=str(keys_dir)), "scheduler")
    assert keys is not None and set(keys.server_keys) == {"scheduler", "frontend", "worker"}


# ---- Curve on live sockets -----------------------------------------------------------------------

IN_S = 15.0  # a peer that must get an answer gets it within this (generous: a loaded machine)
OUT_S = 1.5  # a peer that must get none has had this long to get one


async def _pong(endpoint: str, ctx: zmq.asyncio.Context, server_role: str | None = "scheduler",
                timeout_s: float = OUT_S) -> bool:
    sock = MessageSocket.connect(ctx, zmq.DEALER, endpoint, SchedulerReplies, server_role=server_role)
    try:
        reply = await request(sock, Ping(sender_id="t"), timeout_s=timeout_s)
        return isinstance(reply, Pong)
    except asyncio.TimeoutError:
        return False
    finally:
        sock.close()


async def test_curve_server_accepts_only_listed_client_keys(keys_dir):
    server_ctx = use_curve(zmq.asyncio.Context(), load_keys(keys_dir, "scheduler"))
    endpoint = free_endpoint()
    server = MessageSocket.bind(server_ctx, zmq.ROUTER, endpoint, SchedulerInbound)

    async def handle(rec):
        return Pong.to(rec.msg, sender_id="s") if isinstance(rec.msg, Ping) else None

    task = asyncio.create_task(serve(server, handle))
    contexts = []

    def context(keys=None) -> zmq.asyncio.Context:
        contexts.append(use_curve(zmq.asyncio.Context(), keys))
        return contexts[-1]

    try:
        for role in ("client", "worker", "frontend"):  # every listed identity gets in
            assert await _pong(endpoint, context(load_keys(keys_dir, role)), timeout_s=IN_S)
        public, secret = zmq.curve_keypair()  # a well-formed keypair nobody listed
        stranger = dataclasses.replace(load_keys(keys_dir, "client"), public=public, secret=secret)
        wrong_server = dataclasses.replace(load_keys(keys_dir, "client"),
                                           server_keys={"scheduler": load_keys(keys_dir, "worker").public})
        # no Curve at all; a stranger; a server that cannot prove it is the scheduler (all at once:
        # each waits OUT_S for the answer that must not come)
        assert await asyncio.gather(_pong(endpoint, context()), _pong(endpoint, context(stranger)),
                                    _pong(endpoint, context(wrong_server))) == [False, False, False]
        with pytest.raises(ValueError, match="server_role"):  # a forgotten socket fails loudly
            await _pong(endpoint, context(load_keys(keys_dir, "client")), server_role=None)
        (keys_dir / "client.key").unlink()  # revoking a client takes effect without a restart
        os.utime(keys_dir, ns=(0, 1))  # make sure the directory stamp changes even on coarse clocks
        assert not await _pong(endpoint, context(load_keys(keys_dir, "client")))
        assert await _pong(endpoint, context(load_keys(keys_dir, "worker")), timeout_s=IN_S)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        server.close()
        for c in contexts:
            c.destroy(linger=0)
        done = threading.Event()  # term() must not hang on the ZAP handler's socket
        threading.Thread(target=lambda: (server_ctx.term(), done.set()), daemon=True).start()
        assert done.wait(5), "the context with a ZAP handler did not terminate"


def test_destroy_with_zap_handler_returns(keys_dir):
    ctx = use_curve(zmq.Context(), load_keys(keys_dir, "worker"))
    sock = ctx.socket(zmq.ROUTER)
    secure(sock, server=True)
    sock.bind("tcp://127.0.0.1:*")
    done = threading.Event()
    threading.Thread(target=lambda: (ctx.destroy(linger=0), done.set()), daemon=True).start()
    assert done.wait(5)


async def test_curve_off_changes_nothing():
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    secure(sock, server=False)  # no keys on the context: a no-op, even without a server role
    assert sock.getsockopt(zmq.MECHANISM) == zmq.NULL
    sock.close()
    ctx.term()


# ---- the SDK endpoint: API key and message size --------------------------------------------------

@pytest.fixture
async def fake_cluster():
    c = FakeCluster()
    await c.start()
    yield c
    await c.close()


async def test_sdk_api_key(fake_cluster):
    from services.frontend.server import Frontend
    from sdk import AsyncClient, Unauthorized

    fe = Frontend(make_cfg(fake_cluster, api_key="sekret"), tokenizer=TOK, model_name="tiny")
    await fe.start()
    try:
        for key in (None, "wrong", "sekret2", "", "sékret"):
            async with AsyncClient(fe.sdk_endpoint, timeout=5, api_key=key) as sdk:
                with pytest.raises(Unauthorized) as err:
                    await sdk.generate("hey", max_tokens=64)
                assert err.value.code == "unauthorized"
        assert not fake_cluster.added  # nothing reached a worker
        async with AsyncClient(fe.sdk_endpoint, timeout=5, api_key="sekret") as sdk:
            assert (await sdk.generate("hey", max_tokens=64)).text == ANSWER
            assert "".join([c.text async for c in sdk.stream("hey", max_tokens=64)]) == ANSWER
    finally:
        await fe.stop()


async def test_sdk_message_limit_is_max_body_bytes(fake_cluster):
    from services.frontend.server import Frontend
    from sdk import AsyncClient, InvalidRequest, SdkError

    fe = Frontend(make_cfg(fake_cluster, max_body_bytes=4096, max_prompt_tokens=100, max_tokens_limit=50),
                  tokenizer=TOK, model_name="tiny")
    await fe.start()
    try:
        async with AsyncClient(fe.sdk_endpoint, timeout=5) as sdk:
            with pytest.raises(SdkError) as err:
                await sdk.generate("x" * 5000, max_tokens=4)
            assert err.value.code == "too_large"
            with pytest.raises(InvalidRequest, match="100"):
                await sdk.generate("x" * 200, max_tokens=4)  # prompt_tokens limit
            with pytest.raises(InvalidRequest, match="max_tokens"):
                await sdk.generate("x", max_tokens=51)
            assert (await sdk.generate("hey", max_tokens=50)).text == ANSWER  # and it keeps serving
    finally:
        await fe.stop()


# ---- nothing pickled, loopback by default --------------------------------------------------------

WIRE_PACKAGES = ("protocol", "services", "sdk", "kv_transfer", "cli", "bench")
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle", "joblib", "copyreg"}
PICKLE_CALLS = {"send_pyobj", "recv_pyobj", "send_serialized", "recv_serialized", "loads", "load"}


def _python_files():
    for pkg in WIRE_PACKAGES:
        yield from sorted((REPO / pkg).rglob("*.py"))


def test_nothing_pickled_on_any_wire():
    """No pickle-family module is imported and no pickling socket/loader call is made by any code
    that touches a socket, a shm ring or a message (protocol, services, sdk, kv_transfer, cli, bench)."""
    offenders = []
    for path in _python_files():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module.split(".")[0]]
            if set(names) & PICKLE_MODULES:
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: imports {names}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner = ast.unparse(node.func.value)
                attr = node.func.attr
                if attr in {"send_pyobj", "recv_pyobj", "send_serialized", "recv_serialized"}:
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: {owner}.{attr}")
                if attr in {"load", "loads"} and owner in {"torch", "numpy", "np"}:
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: {owner}.{attr} (pickle-based)")
                if any(k.arg == "allow_pickle" for k in node.keywords):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: allow_pickle")
    assert not offenders, "\n".join(offenders)
    assert len(list(_python_files())) > 50  # the scan saw the code


def test_loopback_by_default():
    cfg = load_config(env={})
    cl = cfg.cluster
    assert (cl.host, cl.bind_host, cl.http_host) == ("127.0.0.1",) * 3
    assert cl.curve_keys_dir == ""
    for ep in [cl.scheduler(), cl.frontend_sdk(0), cl.frontend_tokens(0), cl.worker_control(3), cl.worker_migration(3)]:
        assert cl.bind(ep).startswith("tcp://127.0.0.1:"), ep
    assert cl.scheduler_bind().startswith("tcp://127.0.0.1:")
    wide = dataclasses.replace(cl, bind_host="0.0.0.0", host="10.1.2.3")
    assert wide.bind(wide.worker_control(0)) == f"tcp://0.0.0.0:{wide.base_port + 100}"


def test_every_bind_site_uses_the_cluster_bind_address():
    """Each ZeroMQ bind in services/ binds `cfg.cluster.bind(...)` (or the scheduler's bind address),
    and each HTTP listener `http_host`: no socket picks its own interface."""
    sites = []
    for path in sorted((REPO / "services").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            src = ast.unparse(node)
            rel = f"{path.relative_to(REPO)}:{node.lineno}"
            if ast.unparse(node.func) == "MessageSocket.bind":
                endpoint = ast.unparse(node.args[2])
                sites.append(rel)
                # sdk_server.py receives `endpoint`, which its only caller (server.py) computes with cluster.bind.
                assert ("cluster.bind(" in endpoint or "scheduler_bind()" in endpoint or endpoint == "bind"
                        or (path.name == "sdk_server.py" and endpoint == "endpoint")), f"{rel}: {src}"
            elif node.func.attr == "bind" and node.args and isinstance(node.args[0], ast.Tuple):
                sites.append(rel)
                assert "http_host" in ast.unparse(node.args[0]) or "127.0.0.1" in ast.unparse(node.args[0]), \
                    f"{rel}: {src}"
    server = (REPO / "services/frontend/server.py").read_text()
    assert "SdkServer(self.cfg.frontend, self.cfg.cluster.bind(self.sdk_endpoint)" in server
    assert "bind = cfg.cluster.scheduler_bind()" in (REPO / "services/scheduler/main.py").read_text()
    assert len(sites) >= 5, sites  # scheduler, worker control + migration, frontend SDK + tokens, HTTP


def test_env_turns_curve_on(keys_dir):
    cfg = load_config(env={"KVFERRY_CLUSTER_CURVE_KEYS_DIR": str(keys_dir)})
    assert cfg.cluster.curve_keys_dir == str(keys_dir)
    assert isinstance(KvferryConfig().cluster.curve_keys_dir, str)


def test_messages_round_trip_the_api_key_field():
    from protocol.client import GenerateRequest

    msg = GenerateRequest(prompt="x", api_key="k")
    assert decode(encode(msg), GenerateRequest).api_key == "k"
    assert b"api_key" not in encode(GenerateRequest(prompt="x"))  # omitted when unset: older peers see no change
