# -*- test-case-name: tests.test_sharing -*-
"""
Visitor login with GitHub's OAuth (not OpenID Connect): the relay sends the
visitor to GitHub's authorize page, trades the code for an access token,
and reads the account's I{verified} emails from the API
(C{GET /user/emails}); every verified email joins the visitor's identity,
the primary one first.  Configured as a C{[provider:NAME]} section with
C{type = github}; C{issuer} (GitHub's web URL) and C{api-url} default to
github.com's and can point at GitHub Enterprise.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from txtunnel.allow import isEmail
from txtunnel.oidc import LoginFailed, fetchJSON

__all__ = ["GitHubProvider"]

#: Emails read from the API at most.
MAX_EMAILS = 50


class GitHubProvider:
    """
    One configured GitHub (or GitHub Enterprise) OAuth app.
    """

    kind = "github"

    def __init__(
        self,
        reactor: Any,
        name: str,
        clientID: str,
        clientSecret: str,
        web: str = "https://github.com",
        api: str = "https://api.github.com",
        label: str | None = None,
    ) -> None:
        self.reactor = reactor
        self.name = name
        self.label = label or "GitHub"
        self.clientID = clientID
        self._clientSecret = clientSecret
        self.web = web.rstrip("/")
        self.api = api.rstrip("/")

    def __repr__(self) -> str:
        return f"<GitHubProvider {self.name} {self.web}>"

    async def authorizationURL(
        self, redirectURI: str, state: str, nonce: str, challenge: str, prompt: str | None = None
    ) -> str:
        """
        Where to send the visitor to log in; C{prompt} (C{"select_account"}
        when switching accounts) asks the provider to let them choose.
        """
        query = {
            "client_id": self.clientID,
            "redirect_uri": redirectURI,
            "scope": "user:email",
            "state": state,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
            "allow_signup": "false",
        }
        if prompt:
            # GitHub shows its account picker for prompt=select_account.
            query["prompt"] = prompt
        return f"{self.web}/login/oauth/authorize?" + urlencode(query)

    async def emails(self, code: str, verifier: str, redirectURI: str, nonce: str) -> list[str]:
        status, answer = await fetchJSON(
            self.reactor,
            f"{self.web}/login/oauth/access_token",
            data={
                "client_id": self.clientID,
                "client_secret": self._clientSecret,
                "code": code,
                "redirect_uri": redirectURI,
                "code_verifier": verifier,
            },
        )
        token = answer.get("access_token") if isinstance(answer, dict) else None
        if status != 200 or not isinstance(token, str) or not token:
            error = answer.get("error") if isinstance(answer, dict) else status
            raise LoginFailed(f"the login provider refused the login code ({str(error)[:80]})")
        status, listed = await fetchJSON(
            self.reactor,
            f"{self.api}/user/emails",
            headers={"Authorization": "Bearer " + token, "X-GitHub-Api-Version": "2022-11-28"},
        )
        if status != 200 or not isinstance(listed, list):
            raise LoginFailed("GitHub did not list the account's emails (is the user:email scope allowed?)")
        verified = [
            (not bool(item.get("primary")), str(item["email"]).lower())
            for item in listed[:MAX_EMAILS]
            if isinstance(item, dict) and item.get("verified") is True and isEmail(item.get("email"))
        ]
        if not verified:
            raise LoginFailed("the GitHub account has no verified email")
        return [email for _, email in sorted(verified)]
