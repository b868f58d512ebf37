-- Identity from the organisation's provider: connected providers (an OIDC client and a SCIM
-- token each; the SCIM token only as SHA-256) and sign-ins in flight (state, nonce, PKCE
-- verifier), kept in the database so any replica can finish a sign-in another one began.

CREATE TABLE identity_providers (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    created_at TEXT NOT NULL,
    body TEXT NOT NULL,
    version INTEGER NOT NULL DEFAULT 1,
    client_secret TEXT,
    scim_token_sha256 TEXT UNIQUE
);
CREATE UNIQUE INDEX identity_providers_name ON identity_providers (lower(name));

CREATE TABLE oidc_logins (
    state_sha256 TEXT PRIMARY KEY,
    body TEXT NOT NULL,
    expires_at TEXT NOT NULL
);
