-- The store both backends share: versions for compare-and-swap writes, columns for what was
-- read out of JSON bodies (so queries are the same on PostgreSQL), workflow leases, and the state
-- every replica must see alike (leases, console tickets, sign-in failures).

ALTER TABLE users ADD COLUMN version INTEGER NOT NULL DEFAULT 1;
ALTER TABLE groups ADD COLUMN version INTEGER NOT NULL DEFAULT 1;
ALTER TABLE skus ADD COLUMN version INTEGER NOT NULL DEFAULT 1;
ALTER TABLE device_images ADD COLUMN version INTEGER NOT NULL DEFAULT 1;
ALTER TABLE provisioning_policies ADD COLUMN version INTEGER NOT NULL DEFAULT 1;
ALTER TABLE cloud_pcs ADD COLUMN version INTEGER NOT NULL DEFAULT 1;

CREATE INDEX users_upn_lower ON users (lower(upn));

ALTER TABLE cloud_pcs ADD COLUMN image_id TEXT;
UPDATE cloud_pcs SET image_id = json_extract(state, '$.spec.imageId');
CREATE INDEX cloud_pcs_image ON cloud_pcs (image_id);
ALTER TABLE cloud_pcs ADD COLUMN phase TEXT NOT NULL DEFAULT 'idle';
UPDATE cloud_pcs SET phase = COALESCE(json_extract(state, '$.phase'), 'idle');
ALTER TABLE cloud_pcs ADD COLUMN lease_owner TEXT;
ALTER TABLE cloud_pcs ADD COLUMN lease_expires_at TEXT;
CREATE INDEX cloud_pcs_phase ON cloud_pcs (phase);

ALTER TABLE api_tokens ADD COLUMN role TEXT NOT NULL DEFAULT '';
UPDATE api_tokens SET role = COALESCE(json_extract(body, '$.role'), '');
ALTER TABLE api_tokens ADD COLUMN last_used_at TEXT;
UPDATE api_tokens SET last_used_at = json_extract(body, '$.lastUsedDateTime');

CREATE TABLE leases (
    name TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    expires_at TEXT NOT NULL
);

CREATE TABLE console_tickets (
    secret_sha256 TEXT PRIMARY KEY,
    cloud_pc_id TEXT NOT NULL,
    user_id TEXT,
    grant_body TEXT NOT NULL,
    expires_at TEXT NOT NULL
);

CREATE TABLE sign_in_failures (
    account TEXT PRIMARY KEY,
    failures INTEGER NOT NULL,
    locked_until TEXT,
    last_at TEXT NOT NULL
);
CREATE INDEX sign_in_failures_last ON sign_in_failures (last_at);
