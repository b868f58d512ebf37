-- Portal sign-in: a password hash per user (argon2, PHC string) and server-side sessions.
ALTER TABLE users ADD COLUMN password_hash TEXT;

CREATE TABLE sessions (
    secret_sha256 TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    expires_at TEXT NOT NULL
);
