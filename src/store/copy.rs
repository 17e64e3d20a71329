//! Moving an installation from one store to another (`threadline migrate-store`): every
//! table copied row for row into an empty, migrated destination, in one transaction, so
//! an interrupted copy leaves the destination as it was.

use sqlx::{Column, Row};

use super::{Result, Store, StoreError};

/// The tables, parents before children. Process leases (`instances`) are not copied: the
/// processes of the old store are not those of the new one.
const TABLES: &[&str] = &[
    "pipelines",
    "runs",
    "run_events",
    "requests",
    "chat_messages",
    "pull_requests",
    "approvals",
    "thread_messages",
    "attachments",
    "forge_requests",
    "uploads",
    "workers",
];

/// One value of any column, as the two backends share them.
enum Value {
    Int(Option<i64>),
    Float(Option<f64>),
    Text(Option<String>),
    Bytes(Option<Vec<u8>>),
}

impl Store {
    /// Copies everything into `dst`, which must hold no pipeline yet. Refused while runs
    /// are active here (a daemon still running them would write on after the copy).
    /// Returns each table's row count.
    pub async fn copy_into(&self, dst: &Store) -> Result<Vec<(&'static str, u64)>> {
        let active = self.runs_in_states(&crate::model::RunState::ACTIVE).await?.len();
        if active > 0 {
            return Err(StoreError::Migrate(format!(
                "{active} run(s) are active in the source: stop `threadline serve` (and any `threadline run`) first"
            )));
        }
        let present: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM pipelines")
            .fetch_one(&dst.pool)
            .await?;
        if present > 0 {
            return Err(StoreError::Migrate(format!(
                "the destination already holds {present} pipeline(s); copy into an empty database"
            )));
        }
        let mut counts = Vec::new();
        let mut tx = dst.pool.begin().await?;
        for table in TABLES {
            let rows = sqlx::query(&format!("SELECT * FROM {table}"))
                .fetch_all(&self.pool)
                .await?;
            for row in &rows {
                let names: Vec<String> = row.columns().iter().map(|c| c.name().to_owned()).collect();
                let placeholders: Vec<String> = (1..=names.len()).map(|i| format!("${i}")).collect();
                let sql = format!(
                    "INSERT INTO {table} ({}) VALUES ({})",
                    names.join(", "),
                    placeholders.join(", ")
                );
                let mut insert = sqlx::query(&sql);
                for i in 0..names.len() {
                    insert = match value(row, i)? {
                        Value::Int(v) => insert.bind(v),
                        Value::Float(v) => insert.bind(v),
                        Value::Text(v) => insert.bind(v),
                        Value::Bytes(v) => insert.bind(v),
                    };
                }
                insert.execute(&mut *tx).await?;
            }
            counts.push((*table, rows.len() as u64));
        }
        // PostgreSQL's sequence for run_events must continue after the copied ids.
        if dst.backend == super::Backend::Postgres {
            sqlx::query(
                "SELECT setval(pg_get_serial_sequence('run_events', 'id'), COALESCE((SELECT MAX(id) FROM run_events), 0) + 1, false)",
            )
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(counts)
    }
}

/// Column `i` of `row`, typed as its column is declared (a NULL keeps its column's type,
/// which PostgreSQL insists on).
fn value(row: &sqlx::any::AnyRow, i: usize) -> Result<Value> {
    use sqlx::TypeInfo;
    let declared = row.columns()[i].type_info().name().to_ascii_uppercase();
    Ok(if declared.contains("INT") {
        Value::Int(row.try_get(i)?)
    } else if ["REAL", "DOUBLE", "FLOAT"].iter().any(|t| declared.contains(t)) {
        Value::Float(row.try_get(i)?)
    } else if ["BLOB", "BYTEA"].iter().any(|t| declared.contains(t)) {
        Value::Bytes(row.try_get(i)?)
    } else {
        Value::Text(row.try_get(i)?)
    })
}
