-- cloudpc's schema on PostgreSQL: the same tables and columns as the SQLite migrations 0001-0005
-- end with, with real timestamps (timestamptz). Each resource keeps its Graph-shaped body as JSON
-- text, next to the columns that carry keys, uniqueness, references and versions.

CREATE TABLE users (
    id TEXT PRIMARY KEY,
    upn TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    body TEXT NOT NULL,
    password_hash TEXT,
    version BIGINT NOT NULL DEFAULT 1
);
CREATE UNIQUE INDEX users_upn_lower ON users (lower(upn));

CREATE TABLE groups (
    id TEXT PRIMARY KEY,
    created_at TIMESTAMPTZ NOT NULL,
    body TEXT NOT NULL,
    version BIGINT NOT NULL DEFAULT 1
);

CREATE TABLE group_members (
    group_id TEXT NOT NULL REFERENCES groups(id) ON DELETE CASCADE,
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    added_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (group_id, user_id)
);
CREATE INDEX group_members_user ON group_members(user_id);

CREATE TABLE skus (
    id TEXT PRIMARY KEY,
    part_number TEXT NOT NULL,
    seats BIGINT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    body TEXT NOT NULL,
    version BIGINT NOT NULL DEFAULT 1
);
CREATE UNIQUE INDEX skus_part_number_lower ON skus (lower(part_number));

CREATE TABLE user_licenses (
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    sku_id TEXT NOT NULL REFERENCES skus(id),
    assigned_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (user_id, sku_id)
);
CREATE INDEX user_licenses_sku ON user_licenses(sku_id);

CREATE TABLE group_licenses (
    group_id TEXT NOT NULL REFERENCES groups(id) ON DELETE CASCADE,
    sku_id TEXT NOT NULL REFERENCES skus(id),
    assigned_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (group_id, sku_id)
);

CREATE TABLE gallery_images (
    id TEXT PRIMARY KEY,
    body TEXT NOT NULL,
    disk TEXT NOT NULL DEFAULT '',
    boot TEXT
);

CREATE TABLE device_images (
    id TEXT PRIMARY KEY,
    created_at TIMESTAMPTZ NOT NULL,
    body TEXT NOT NULL,
    version BIGINT NOT NULL DEFAULT 1
);

CREATE TABLE provisioning_policies (
    id TEXT PRIMARY KEY,
    image_type TEXT NOT NULL,
    image_id TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    body TEXT NOT NULL,
    version BIGINT NOT NULL DEFAULT 1
);

-- position orders the groups within one assign call; assigned_at orders policies against each
-- other for first-assigned-wins and is kept when a group stays assigned across assign calls.
CREATE TABLE policy_assignments (
    policy_id TEXT NOT NULL REFERENCES provisioning_policies(id),
    group_id TEXT NOT NULL REFERENCES groups(id),
    position BIGINT NOT NULL,
    assigned_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (policy_id, group_id)
);

CREATE TABLE cloud_pcs (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    sku_id TEXT NOT NULL,
    policy_id TEXT,
    created_at TIMESTAMPTZ NOT NULL,
    body TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT '{}',
    version BIGINT NOT NULL DEFAULT 1,
    image_id TEXT,
    phase TEXT NOT NULL DEFAULT 'idle',
    lease_owner TEXT,
    lease_expires_at TIMESTAMPTZ
);
-- One Cloud PC per user and license.
CREATE UNIQUE INDEX cloud_pcs_user_sku ON cloud_pcs(user_id, sku_id);
CREATE INDEX cloud_pcs_image ON cloud_pcs (image_id);
CREATE INDEX cloud_pcs_phase ON cloud_pcs (phase);

CREATE TABLE provisioning_steps (
    cloud_pc_id TEXT NOT NULL,
    generation BIGINT NOT NULL,
    attempt BIGINT NOT NULL,
    name TEXT NOT NULL,
    started_at TIMESTAMPTZ NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (cloud_pc_id, generation, attempt, name)
);

CREATE TABLE devices (
    id TEXT PRIMARY KEY,
    cloud_pc_id TEXT NOT NULL,
    body TEXT NOT NULL
);

CREATE TABLE managed_devices (
    id TEXT PRIMARY KEY,
    cloud_pc_id TEXT NOT NULL,
    body TEXT NOT NULL
);

CREATE TABLE sessions (
    secret_sha256 TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    expires_at TIMESTAMPTZ NOT NULL
);

CREATE TABLE api_tokens (
    id TEXT PRIMARY KEY,
    secret_sha256 TEXT NOT NULL UNIQUE,
    created_at TIMESTAMPTZ NOT NULL,
    body TEXT NOT NULL,
    role TEXT NOT NULL DEFAULT '',
    last_used_at TIMESTAMPTZ
);

CREATE TABLE audit_events (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    at TIMESTAMPTZ NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX audit_events_at ON audit_events (at);

-- Audit events are never changed, and deleted only once older than the retention period (the
-- server sets it).
CREATE TABLE audit_retention (
    id BIGINT PRIMARY KEY CHECK (id = 1),
    days BIGINT NOT NULL CHECK (days >= 1)
);
INSERT INTO audit_retention (id, days) VALUES (1, 365);

CREATE FUNCTION audit_events_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' THEN
        RAISE EXCEPTION 'audit events cannot be changed';
    END IF;
    IF OLD.at > now() - make_interval(days => (SELECT days FROM audit_retention WHERE id = 1)::int) THEN
        RAISE EXCEPTION 'audit events are deleted only once older than the retention period';
    END IF;
    RETURN OLD;
END
$$;
CREATE TRIGGER audit_events_guard BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_guard();

CREATE TABLE leases (
    name TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL
);

CREATE TABLE console_tickets (
    secret_sha256 TEXT PRIMARY KEY,
    cloud_pc_id TEXT NOT NULL,
    user_id TEXT,
    grant_body TEXT NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL
);

CREATE TABLE sign_in_failures (
    account TEXT PRIMARY KEY,
    failures BIGINT NOT NULL,
    locked_until TIMESTAMPTZ,
    last_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX sign_in_failures_last ON sign_in_failures (last_at);
