-- Audit events: read a page at a time in time order, and deleted only once older than the
-- retention period (the server sets it; the trigger keeps any other delete out).
CREATE INDEX audit_events_at ON audit_events (at);
DROP TRIGGER audit_events_no_delete;
CREATE TABLE audit_retention (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    days INTEGER NOT NULL CHECK (days >= 1)
);
INSERT INTO audit_retention (id, days) VALUES (1, 365);
CREATE TRIGGER audit_events_delete_only_expired BEFORE DELETE ON audit_events
WHEN julianday(OLD.at) > julianday('now') - (SELECT days FROM audit_retention WHERE id = 1)
BEGIN SELECT RAISE(ABORT, 'audit events are deleted only once older than the retention period'); END;
