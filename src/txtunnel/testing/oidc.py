# -*- test-case-name: tests.test_sharing -*-
"""
A small but real OpenID Connect provider for tests and local development.

It is authlib's authorization server (authorization code grant, PKCE with
C{S256} required, the OpenID Connect code extension signing ID tokens with
an RS256 key published at its JWKS endpoint, discovery at
C{/.well-known/openid-configuration}) in a Flask app, served by werkzeug on
a loopback port in a thread.  The only shortcut is the login itself: the
authorization endpoint approves at once as the provider's current user
(C{provider.user}), so a test can switch who "logs in".

Run it for the walk-through in docs/sharing.rst::

    python -m txtunnel.testing.oidc --port 9000 --email alice@example.com \\
        --client-id relay --client-secret s3cret \\
        --redirect-uri http://localhost:8080/_txtunnel/callback

It needs the C{tests} extra (flask, authlib).
"""

from __future__ import annotations

import secrets
import threading
import time
from typing import Any

__all__ = ["TestProvider"]


class _Client:
    """
    One registered relying party (authlib's ClientMixin protocol).
    """

    def __init__(self, clientID: str, secret: str, redirectURIs: list[str]) -> None:
        self.client_id = clientID
        self.client_secret = secret
        self.redirectURIs = redirectURIs

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> str:
        return self.redirectURIs[0]

    def get_allowed_scope(self, scope: str) -> str:
        allowed = {"openid", "email", "profile"}
        return " ".join(s for s in (scope or "").split() if s in allowed)

    def check_redirect_uri(self, uri: str) -> bool:
        return uri in self.redirectURIs

    def check_client_secret(self, secret: str) -> bool:
        return secrets.compare_digest(secret.encode(), self.client_secret.encode())

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method in ("client_secret_basic", "client_secret_post")

    def check_response_type(self, responseType: str) -> bool:
        return responseType == "code"

    def check_grant_type(self, grantType: str) -> bool:
        return grantType == "authorization_code"


class _Code:
    """
    An issued authorization code, with what the token request is checked
    against.
    """

    def __init__(self, code: str, request: Any, user: dict[str, Any]) -> None:
        payload = request.payload
        self.code = code
        self.client_id = request.client.client_id
        self.redirect_uri = payload.redirect_uri
        self.scope = payload.scope
        self.nonce = payload.data.get("nonce")
        self.code_challenge = payload.data.get("code_challenge")
        self.code_challenge_method = payload.data.get("code_challenge_method")
        self.user = user
        self.issued = time.time()

    def get_redirect_uri(self) -> str:
        return self.redirect_uri  # type: ignore[no-any-return]

    def get_scope(self) -> str:
        return self.scope  # type: ignore[no-any-return]

    def get_nonce(self) -> str | None:
        return self.nonce  # type: ignore[no-any-return]

    def get_auth_time(self) -> int:
        return int(self.issued)

    def get_acr(self) -> str | None:
        return None

    def get_amr(self) -> list[str] | None:
        return None

    def is_expired(self) -> bool:
        return time.time() - self.issued > 600


class TestProvider:
    """
    The provider: C{start()} serves it on 127.0.0.1 (port 0 picks a free
    one), C{stop()} shuts it down.  C{issuer} is its base URL.
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        clientID: str = "relay",
        clientSecret: str = "relay-secret",
        redirectURIs: list[str] | None = None,
        user: dict[str, Any] | None = None,
        port: int = 0,
        host: str = "127.0.0.1",
    ) -> None:
        from joserfc.jwk import RSAKey

        self.host = host
        self.port = port
        self.client = _Client(clientID, clientSecret, list(redirectURIs or []))
        self.user: dict[str, Any] = user or {"sub": "alice", "email": "alice@example.com", "email_verified": True}
        self.key = RSAKey.generate_key(2048, parameters={"kid": "test-1", "use": "sig", "alg": "RS256"})
        self.codes: dict[str, _Code] = {}
        #: When set, the authorization page offers these accounts to pick from.
        self.choices: list[str] = []
        #: Token requests answered, for tests that count them.
        self.tokenRequests = 0
        #: Key set requests answered, and the query of each authorization
        #: request, for tests that look at them.
        self.jwksRequests = 0
        self.authorizeQueries: list[dict[str, str]] = []
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.issuer = ""

    def rotate(self) -> None:
        """
        Sign with a new key (a new key id) from now on and publish only it,
        as a provider rotating its keys does.
        """
        from joserfc.jwk import RSAKey

        number = int(str(self.key.kid).rpartition("-")[2]) + 1
        self.key = RSAKey.generate_key(2048, parameters={"kid": f"test-{number}", "use": "sig", "alg": "RS256"})

    @property
    def discoveryURL(self) -> str:
        return self.issuer + "/.well-known/openid-configuration"

    def _app(self) -> Any:
        from authlib.integrations.flask_oauth2 import AuthorizationServer
        from authlib.oauth2.rfc6749 import grants
        from authlib.oauth2.rfc7636 import CodeChallenge
        from authlib.oidc.core.grants import OpenIDCode
        from flask import Flask, jsonify, request

        provider = self
        app = Flask("txtunnel-test-oidc")

        class CodeGrant(grants.AuthorizationCodeGrant):  # type: ignore[misc]
            TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_basic", "client_secret_post"]

            def save_authorization_code(self, code: str, request: Any) -> None:
                provider.codes[code] = _Code(code, request, dict(request.user))

            def query_authorization_code(self, code: str, client: Any) -> _Code | None:
                item = provider.codes.get(code)
                if item is not None and item.client_id == client.client_id and not item.is_expired():
                    return item
                return None

            def delete_authorization_code(self, code: _Code) -> None:
                provider.codes.pop(code.code, None)

            def authenticate_user(self, code: _Code) -> dict[str, Any]:
                return code.user

        class IDToken(OpenIDCode):  # type: ignore[misc]
            def resolve_client_private_key(self, client: Any) -> Any:
                return provider.key

            def get_client_algorithm(self, client: Any) -> str:
                return "RS256"

            def get_client_claims(self, client: Any) -> dict[str, Any]:
                return {"iss": provider.issuer, "aud": [client.client_id], "exp": int(time.time()) + 300}

            def get_encode_header(self, client: Any) -> dict[str, Any]:
                return {"alg": "RS256", "kid": provider.key.kid}

            def exists_nonce(self, nonce: str, request: Any) -> bool:
                return any(c.nonce == nonce for c in provider.codes.values())

            def generate_user_info(self, user: dict[str, Any], scope: str) -> dict[str, Any]:
                info = {"sub": user["sub"]}
                if "email" in scope.split():
                    info["email"] = user["email"]
                    info["email_verified"] = bool(user.get("email_verified", True))
                return info

        def saveToken(token: dict[str, Any], request: Any) -> None:
            provider.tokenRequests += 1

        server = AuthorizationServer(
            app,
            query_client=lambda cid: provider.client if cid == provider.client.client_id else None,
            save_token=saveToken,
        )
        server.register_grant(CodeGrant, [CodeChallenge(required=True), IDToken(require_nonce=True)])

        @app.get("/.well-known/openid-configuration")
        def discovery() -> Any:
            return jsonify(
                issuer=provider.issuer,
                authorization_endpoint=provider.issuer + "/authorize",
                token_endpoint=provider.issuer + "/token",
                jwks_uri=provider.issuer + "/jwks",
                response_types_supported=["code"],
                subject_types_supported=["public"],
                id_token_signing_alg_values_supported=["RS256"],
                code_challenge_methods_supported=["S256"],
                scopes_supported=["openid", "email", "profile"],
                token_endpoint_auth_methods_supported=["client_secret_basic", "client_secret_post"],
            )

        @app.get("/jwks")
        def jwks() -> Any:
            provider.jwksRequests += 1
            return jsonify(keys=[provider.key.as_dict(private=False)])

        @app.get("/authorize")
        def authorize() -> Any:
            # The test user approves at once: this is where a real
            # provider would show its login and consent pages.
            from authlib.oauth2 import OAuth2Error
            from markupsafe import escape

            provider.authorizeQueries.append(dict(request.args))
            user = dict(provider.user)
            if provider.choices:
                # Several test accounts: let the person pick one.
                chosen = request.args.get("login_as")
                if chosen not in provider.choices:
                    links = "".join(
                        f'<li><a href="?{escape(request.query_string.decode())}&amp;login_as={escape(email)}">'
                        f"Log in as {escape(email)}</a></li>"
                        for email in provider.choices
                    )
                    return f"<!doctype html><title>Test provider</title><h1>Test provider</h1><ul>{links}</ul>"
                user = {"sub": chosen, "email": chosen, "email_verified": True}
            try:
                grant = server.get_consent_grant(end_user=user)
            except OAuth2Error as error:
                return server.handle_error_response(None, error)
            return server.create_authorization_response(grant_user=user, grant=grant)

        @app.post("/token")
        def token() -> Any:
            return server.create_token_response()

        return app

    def start(self) -> TestProvider:
        from werkzeug.serving import WSGIRequestHandler, make_server

        class Quiet(WSGIRequestHandler):
            def log_request(self, *args: Any, **kwargs: Any) -> None:
                pass

        self._server = make_server(self.host, self.port, self._app(), threaded=True, request_handler=Quiet)
        self.port = self._server.server_port
        self.issuer = f"http://{self.host}:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="test-oidc", daemon=True)
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


def main(argv: list[str] | None = None) -> None:
    """
    Serve a development provider until interrupted.
    """
    import argparse

    parser = argparse.ArgumentParser(description="A local OpenID Connect provider that logs everyone in as --email.")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--email", action="append", help="an account to log in as (repeat to choose on the login page)")
    parser.add_argument("--client-id", default="relay")
    parser.add_argument("--client-secret", default="relay-secret")
    parser.add_argument("--redirect-uri", action="append", required=True)
    args = parser.parse_args(argv)
    emails = args.email or ["alice@example.com"]
    user = {"sub": emails[0], "email": emails[0], "email_verified": True}
    provider = TestProvider(args.client_id, args.client_secret, args.redirect_uri, user, args.port, args.host)
    if len(emails) > 1:
        provider.choices = emails
    provider.start()
    print(f"OpenID Connect test provider at {provider.issuer}; accounts: {', '.join(emails)}", flush=True)
    try:
        assert provider._thread is not None
        while provider._thread.is_alive():
            provider._thread.join(1)
    except KeyboardInterrupt:
        provider.stop()


if __name__ == "__main__":
    main()
