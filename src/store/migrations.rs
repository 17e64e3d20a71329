//! Embedded migrations, one folder per backend. Released migrations are never edited,
//! only appended to.

use std::borrow::Cow;

use futures_util::future::BoxFuture;
use sqlx::AnyPool;
use sqlx::error::BoxDynError;
use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};

/// The migrations of one backend's folder, in order: the same names and versions for
/// both, so a database of either has the same schema after the same migrations.
macro_rules! migrations {
    ($dir:literal) => {
        &[
            (1, "init", include_str!(concat!("migrations/", $dir, "/0001_init.sql"))),
            (
                2,
                "chat messages",
                include_str!(concat!("migrations/", $dir, "/0002_chat_messages.sql")),
            ),
            (
                3,
                "origin url",
                include_str!(concat!("migrations/", $dir, "/0003_origin_url.sql")),
            ),
            (
                4,
                "pull requests",
                include_str!(concat!("migrations/", $dir, "/0004_pull_requests.sql")),
            ),
            (
                5,
                "conversation",
                include_str!(concat!("migrations/", $dir, "/0005_conversation.sql")),
            ),
            (
                6,
                "agent sessions",
                include_str!(concat!("migrations/", $dir, "/0006_agent_sessions.sql")),
            ),
            (
                7,
                "attachments",
                include_str!(concat!("migrations/", $dir, "/0007_attachments.sql")),
            ),
            (
                8,
                "thread files",
                include_str!(concat!("migrations/", $dir, "/0008_thread_files.sql")),
            ),
            (
                9,
                "pull request state",
                include_str!(concat!("migrations/", $dir, "/0009_pull_request_state.sql")),
            ),
            (
                10,
                "approved commit",
                include_str!(concat!("migrations/", $dir, "/0010_approved_commit.sql")),
            ),
            (
                11,
                "forge reviews",
                include_str!(concat!("migrations/", $dir, "/0011_forge_reviews.sql")),
            ),
        ]
    };
}

const SQLITE: &[(i64, &str, &str)] = migrations!("sqlite");
/// PostgreSQL's differ from SQLite's only where the dialects do: those files are in
/// `migrations/postgres/` and replace SQLite's of the same version.
const POSTGRES_OWN: &[(i64, &str)] = &[(1, include_str!("migrations/postgres/0001_init.sql"))];

fn postgres() -> Vec<(i64, &'static str, &'static str)> {
    SQLITE
        .iter()
        .map(|&(version, name, sql)| {
            let own = POSTGRES_OWN.iter().find(|(v, _)| *v == version);
            (version, name, own.map_or(sql, |(_, sql)| *sql))
        })
        .collect()
}

#[derive(Debug)]
struct Embedded(Vec<(i64, &'static str, &'static str)>);

impl MigrationSource<'static> for Embedded {
    fn resolve(self) -> BoxFuture<'static, Result<Vec<Migration>, BoxDynError>> {
        Box::pin(async move {
            Ok(self
                .0
                .iter()
                .map(|(version, name, sql)| {
                    Migration::new(
                        *version,
                        Cow::Borrowed(name),
                        MigrationType::Simple,
                        Cow::Borrowed(sql),
                        false,
                    )
                })
                .collect())
        })
    }
}

pub async fn run(pool: &AnyPool, backend: &str) -> Result<(), sqlx::migrate::MigrateError> {
    let migrations = match backend {
        "sqlite" => SQLITE.to_vec(),
        "postgres" | "postgresql" => postgres(),
        other => {
            return Err(sqlx::migrate::MigrateError::Source(
                format!("no migrations for the {other:?} backend (supported: sqlite, postgres)").into(),
            ));
        }
    };
    Migrator::new(Embedded(migrations)).await?.run(pool).await
}
