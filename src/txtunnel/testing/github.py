# -*- test-case-name: tests.test_sharing -*-
"""
A GitHub-shaped OAuth server for tests: C{/login/oauth/authorize} (approves
at once as the current user), C{/login/oauth/access_token} (codes good
once, bound to the client, redirect URI and PKCE verifier) and
C{/api/user/emails} (the user's emails, verified or not), as GitHub
answers them.  Flask on werkzeug, in a thread, on loopback.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import threading
from typing import Any
from urllib.parse import urlencode

__all__ = ["FakeGitHub"]


class FakeGitHub:
    __test__ = False

    def __init__(self, clientID: str = "gh-relay", clientSecret: str = "gh-secret") -> None:
        self.clientID = clientID
        self.clientSecret = clientSecret
        #: The logged-in user's emails, as C{/user/emails} lists them.
        self.emails: list[dict[str, Any]] = [
            {"email": "alice@example.com", "verified": True, "primary": True, "visibility": "private"}
        ]
        self.codes: dict[str, dict[str, Any]] = {}
        self.tokens: dict[str, list[dict[str, Any]]] = {}
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def _app(self) -> Any:
        from flask import Flask, jsonify, redirect, request

        app = Flask("fake-github")
        fake = self

        @app.get("/login/oauth/authorize")
        def authorize() -> Any:
            args = request.args
            if args.get("client_id") != fake.clientID:
                return "unknown client", 404
            code = secrets.token_hex(10)
            fake.codes[code] = {
                "redirect_uri": args.get("redirect_uri"),
                "challenge": args.get("code_challenge"),
                "emails": [dict(e) for e in fake.emails],
            }
            return redirect(args["redirect_uri"] + "?" + urlencode({"code": code, "state": args.get("state", "")}))

        @app.post("/login/oauth/access_token")
        def accessToken() -> Any:
            form = request.form
            grant = fake.codes.pop(form.get("code", ""), None)
            if form.get("client_id") != fake.clientID or not secrets.compare_digest(
                form.get("client_secret", ""), fake.clientSecret
            ):
                return jsonify(error="incorrect_client_credentials")
            if grant is None or grant["redirect_uri"] != form.get("redirect_uri"):
                # GitHub answers 200 with an error field.
                return jsonify(error="bad_verification_code")
            if grant["challenge"]:
                digest = hashlib.sha256(form.get("code_verifier", "").encode()).digest()
                if base64.urlsafe_b64encode(digest).rstrip(b"=").decode() != grant["challenge"]:
                    return jsonify(error="bad_verification_code")
            token = "gho_" + secrets.token_hex(16)
            fake.tokens[token] = grant["emails"]
            return jsonify(access_token=token, token_type="bearer", scope="user:email")

        @app.get("/api/user/emails")
        def emails() -> Any:
            auth = request.headers.get("Authorization", "")
            listed = fake.tokens.get(auth.removeprefix("Bearer ").removeprefix("token "))
            if listed is None:
                return jsonify(message="Bad credentials"), 401
            return jsonify(listed)

        return app

    def start(self) -> FakeGitHub:
        from werkzeug.serving import WSGIRequestHandler, make_server

        class Quiet(WSGIRequestHandler):
            def log_request(self, *args: Any, **kwargs: Any) -> None:
                pass

        self._server = make_server("127.0.0.1", 0, self._app(), threaded=True, request_handler=Quiet)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-github", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
