"""A local stand-in for the Stripe API, and Stripe's side of a webhook, for tests.

FakeStripe is a threaded HTTP server that answers `POST /v1/checkout/sessions` the way Stripe
does: form-encoded parameters in, a Checkout Session as JSON out, and an Idempotency-Key that
returns the first answer again (or a 400 when the parameters differ). The real `stripe` client is
pointed at it through STRIPE_API_BASE, so the tests exercise the SDK's own encoding, headers and
retries. `signature_header` signs a webhook body exactly as Stripe documents it.
"""

import hashlib
import hmac
import json
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl


def signature_header(payload: str, secret: str, timestamp: int | None = None) -> str:
    """Stripe-Signature: t=<unix time>,v1=<hex HMAC-SHA256 of "<t>.<body>" keyed by the secret>."""
    timestamp = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret.encode(), f"{timestamp}.{payload}".encode(), hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def checkout_event(session: dict, event_type: str, *, payment_status: str, event_id: str | None = None, **changes):
    """The webhook body Stripe sends for a Checkout Session (a snapshot event), as JSON text."""
    body = {
        "id": event_id or f"evt_{secrets.token_hex(12)}",
        "object": "event",
        "api_version": "2025-01-01",
        "created": int(time.time()),
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "type": event_type,
        "data": {
            "object": {
                **session,
                "status": "expired" if event_type == "checkout.session.expired" else "complete",
                "payment_status": payment_status,
                **changes,
            }
        },
    }
    return json.dumps(body)


def unflatten(pairs: list[tuple[str, str]]) -> dict:
    """Stripe's form encoding (a[b][0][c]=v) back into nested dicts and lists."""
    root: dict = {}
    for key, value in pairs:
        parts = re.findall(r"[^\[\]]+", key)
        node = root
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value

    def lists(node):
        if not isinstance(node, dict):
            return node
        if node and all(k.isdigit() for k in node):
            return [lists(node[k]) for k in sorted(node, key=int)]
        return {k: lists(v) for k, v in node.items()}

    return lists(root)


@dataclass
class ApiCall:
    path: str
    params: dict
    idempotency_key: str | None
    authorization: str | None


@dataclass
class FakeStripe:
    """Start with `with FakeStripe() as fake:`; point STRIPE_API_BASE at fake.url."""

    calls: list[ApiCall] = field(default_factory=list)
    sessions: dict[str, dict] = field(default_factory=dict)
    # Queued failures, answered in order before normal service: (status, error type, message, created?)
    failures: list[tuple[int, str, str, bool]] = field(default_factory=list)
    _by_key: dict[str, tuple[dict, dict]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def fail_next(self, status: int, error_type: str, message: str, *, after_creating: bool = False) -> None:
        """Answer the next request with an error; after_creating: the session is made anyway (a
        response lost on the way back), so a retry with the same key must get it, not a new one."""
        self.failures.append((status, error_type, message, after_creating))

    def __enter__(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                pairs = parse_qsl(self.rfile.read(length).decode(), keep_blank_values=True)
                status, body, extra = fake.handle(
                    self.path, pairs, self.headers.get("Idempotency-Key"), self.headers.get("Authorization")
                )
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Request-Id", f"req_{secrets.token_hex(8)}")
                for name, value in extra.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()

    def handle(self, path: str, pairs, idempotency_key, authorization) -> tuple[int, dict, dict]:
        params = unflatten(pairs)
        with self._lock:
            self.calls.append(ApiCall(path, params, idempotency_key, authorization))
            if not (authorization or "").startswith("Bearer sk_"):
                return 401, _error("invalid_request_error", "Invalid API Key provided."), {}
            if path != "/v1/checkout/sessions":
                return 404, _error("invalid_request_error", f"Unrecognized request URL (POST: {path})."), {}
            if idempotency_key in self._by_key:
                first_params, session = self._by_key[idempotency_key]
                if first_params != params:
                    message = (
                        "Keys for idempotent requests can only be used with the same parameters "
                        "they were first used with."
                    )
                    return 400, _error("idempotency_error", message), {}
                return 200, session, {"Idempotent-Replayed": "true", "Idempotency-Key": idempotency_key}
            failure = self.failures.pop(0) if self.failures else None
            if failure and not failure[3]:
                return failure[0], _error(failure[1], failure[2]), {"Stripe-Should-Retry": "false"}
            session = self._session(params)
            if idempotency_key:
                self._by_key[idempotency_key] = (params, session)
            if failure:
                return failure[0], _error(failure[1], failure[2]), {}
            return 200, session, {}

    def _session(self, params: dict) -> dict:
        session_id = f"cs_test_{secrets.token_hex(16)}"
        item = params["line_items"][0]
        amount = int(item["price_data"]["unit_amount"]) * int(item["quantity"])
        session = {
            "id": session_id,
            "object": "checkout.session",
            "mode": params["mode"],
            "url": f"https://checkout.stripe.com/c/pay/{session_id}",
            "amount_subtotal": amount,
            "amount_total": amount,
            "currency": item["price_data"]["currency"],
            "client_reference_id": params.get("client_reference_id"),
            "customer_email": params.get("customer_email"),
            "metadata": params.get("metadata", {}),
            "payment_method_types": params["payment_method_types"],
            "payment_status": "unpaid",
            "status": "open",
            "success_url": params["success_url"],
            "cancel_url": params["cancel_url"],
            "livemode": False,
        }
        self.sessions[session_id] = session
        return session


def _error(error_type: str, message: str) -> dict:
    return {"error": {"type": error_type, "message": message}}
