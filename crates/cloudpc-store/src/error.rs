//! The store's one error type: what went wrong, in a sentence, with the cause kept as source.

/// An error from the data-access layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{kind} '{id}' does not exist")]
    NotFound { kind: &'static str, id: String },
    /// A rule the write would break, such as "in use" or a duplicate name; the sentence says which.
    #[error("{0}")]
    Conflict(String),
    #[error(
        "license '{sku_part_number}' has {seats} seats and this change would need {needed}; add seats or remove the license from someone first"
    )]
    SeatsExceeded { sku_part_number: String, seats: u32, needed: u32 },
    /// A compare-and-swap write found the row changed since it was read.
    #[error("{kind} '{id}' was changed by someone else meanwhile; read it again and retry")]
    Stale { kind: &'static str, id: String },
    /// A workflow write by a replica that no longer holds the Cloud PC's workflow lease.
    #[error("this replica no longer holds the workflow lease of Cloud PC '{0}'; another replica carries on")]
    LeaseLost(String),
    #[error("the database could not complete the request")]
    Database(#[source] sqlx::Error),
    #[error("the database could not apply its migrations")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    /// The database has migrations this binary does not know: a newer cloudpc set it up.
    #[error(
        "the database schema is at version {database}, newer than this cloudpc knows ({binary}); run the newer cloudpc, or upgrade this one"
    )]
    SchemaTooNew { database: i64, binary: i64 },
    #[error("a stored record could not be read")]
    Corrupt(#[source] serde_json::Error),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        StoreError::Database(e)
    }
}

impl StoreError {
    pub fn not_found(kind: &'static str, id: impl ToString) -> Self {
        StoreError::NotFound { kind, id: id.to_string() }
    }
}
