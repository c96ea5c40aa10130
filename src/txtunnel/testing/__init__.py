"""
Real servers for tests and local development: an OpenID Connect provider
built on authlib's server components (L{txtunnel.testing.oidc}).
"""
