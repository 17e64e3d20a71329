//! Embedded migrations: SQLite's files, translated for PostgreSQL. Released migrations are never edited,
//! only appended to.

use std::borrow::Cow;

use futures_util::future::BoxFuture;
use sqlx::AnyPool;
use sqlx::error::BoxDynError;
use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};

const SQLITE: &[(i64, &str, &str)] = &[
    (1, "init", include_str!("migrations/sqlite/0001_init.sql")),
    (
        2,
        "chat messages",
        include_str!("migrations/sqlite/0002_chat_messages.sql"),
    ),
    (3, "origin url", include_str!("migrations/sqlite/0003_origin_url.sql")),
    (
        4,
        "pull requests",
        include_str!("migrations/sqlite/0004_pull_requests.sql"),
    ),
    (
        5,
        "conversation",
        include_str!("migrations/sqlite/0005_conversation.sql"),
    ),
    (
        6,
        "agent sessions",
        include_str!("migrations/sqlite/0006_agent_sessions.sql"),
    ),
    (7, "attachments", include_str!("migrations/sqlite/0007_attachments.sql")),
    (
        8,
        "thread files",
        include_str!("migrations/sqlite/0008_thread_files.sql"),
    ),
    (
        9,
        "pull request state",
        include_str!("migrations/sqlite/0009_pull_request_state.sql"),
    ),
    (
        10,
        "approved commit",
        include_str!("migrations/sqlite/0010_approved_commit.sql"),
    ),
    (
        11,
        "forge reviews",
        include_str!("migrations/sqlite/0011_forge_reviews.sql"),
    ),
    (12, "workers", include_str!("migrations/sqlite/0012_workers.sql")),
    (
        13,
        "queue order",
        include_str!("migrations/sqlite/0013_queue_order.sql"),
    ),
];

/// PostgreSQL's migrations: SQLite's, translated where the dialects differ (the same
/// versions and names, so both stores have the same schema after the same migrations).
fn postgres() -> Vec<(i64, &'static str, Cow<'static, str>)> {
    const DIALECT: &[(&str, &str)] = &[
        ("INTEGER PRIMARY KEY AUTOINCREMENT", "BIGSERIAL PRIMARY KEY"),
        (" BLOB ", " BYTEA "),
    ];
    SQLITE
        .iter()
        .map(|&(version, name, sql)| {
            let translated = DIALECT
                .iter()
                .fold(Cow::Borrowed(sql), |sql, (from, to)| match sql.contains(from) {
                    true => Cow::Owned(sql.replace(from, to)),
                    false => sql,
                });
            (version, name, translated)
        })
        .collect()
}

#[derive(Debug)]
struct Embedded(Vec<(i64, &'static str, Cow<'static, str>)>);

impl MigrationSource<'static> for Embedded {
    fn resolve(self) -> BoxFuture<'static, Result<Vec<Migration>, BoxDynError>> {
        Box::pin(async move {
            Ok(self
                .0
                .into_iter()
                .map(|(version, name, sql)| {
                    Migration::new(version, Cow::Borrowed(name), MigrationType::Simple, sql, false)
                })
                .collect())
        })
    }
}

pub async fn run(pool: &AnyPool, backend: &str) -> Result<(), sqlx::migrate::MigrateError> {
    let migrations = match backend {
        "sqlite" => SQLITE.iter().map(|&(v, n, sql)| (v, n, Cow::Borrowed(sql))).collect(),
        "postgres" | "postgresql" => postgres(),
        other => {
            return Err(sqlx::migrate::MigrateError::Source(
                format!("no migrations for the {other:?} backend (supported: sqlite, postgres)").into(),
            ));
        }
    };
    Migrator::new(Embedded(migrations)).await?.run(pool).await
}
